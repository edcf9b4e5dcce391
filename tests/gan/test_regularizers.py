import pytest
import torch
from torch import nn

from gan.regularizers import apply_spectral_norm, gradient_penalty, r1_penalty


class Quadratic(nn.Module):
    """D(x) = sum(w * x^2): its input gradient 2 w x is known in closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.5]))

    def forward(self, x, labels=None):
        return (self.w * x.square()).sum(dim=1)


def test_gradient_penalty_matches_closed_form():
    d = Quadratic()
    real = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    fake = torch.tensor([[3.0, 0.0], [2.0, 1.0]])
    gen = torch.Generator().manual_seed(3)
    alpha = torch.rand(2, 1, generator=torch.Generator().manual_seed(3))
    mixed = alpha * real + (1 - alpha) * fake
    expected = ((2 * d.w.detach() * mixed).norm(dim=1) - 1).square().mean()
    assert gradient_penalty(d, real, fake, generator=gen).item() == pytest.approx(expected.item())


def test_gradient_penalty_is_zero_for_unit_slope_and_trains_d():
    d = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        d.weight.copy_(torch.tensor([[0.6, 0.8, 0.0]]))  # |grad| = 1 everywhere
    critic = lambda x, labels=None: d(x).squeeze(1)  # noqa: E731
    x = torch.randn(5, 3)
    assert gradient_penalty(critic, x, torch.randn(5, 3)).item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        d.weight.mul_(2)
    penalty = gradient_penalty(critic, x, torch.randn(5, 3))
    penalty.backward()
    assert penalty.item() == pytest.approx(1.0)
    assert d.weight.grad.abs().sum() > 0  # the penalty is differentiable w.r.t. D's weights


def test_r1_matches_closed_form_and_autograd():
    d = Quadratic()
    real = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    penalty = r1_penalty(d(real), real)
    expected = (2 * d.w.detach() * real.detach()).square().sum(dim=1).mean()
    assert penalty.item() == pytest.approx(expected.item())
    penalty.backward()
    # d/dw of mean_i sum_j (2 w_j x_ij)^2 = mean_i 8 w_j x_ij^2
    expected_grad = (8 * d.w.detach() * real.detach().square()).mean(dim=0)
    torch.testing.assert_close(d.w.grad, expected_grad)


def _as_matrix(layer) -> torch.Tensor:
    """The weight as the matrix spectral norm normalises: output units along the rows."""
    w = layer.weight.detach()
    if isinstance(layer, nn.ConvTranspose2d):
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def test_spectral_norm_gives_every_layer_kind_unit_singular_value():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.Embedding(5, 6)]
    net = nn.ModuleList(layers)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10)
    apply_spectral_norm(net)
    for layer in layers:
        assert hasattr(layer, "parametrizations"), type(layer).__name__
        for _ in range(50):  # each training-mode access runs one power iteration
            layer.weight  # noqa: B018
        sigma = torch.linalg.matrix_norm(_as_matrix(layer), ord=2)
        assert sigma.item() == pytest.approx(1.0, rel=1e-3), type(layer).__name__


def test_spectral_norm_skips_excluded_modules():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Embedding(3, 2)))
    apply_spectral_norm(net, exclude=(nn.Sequential,))
    assert not hasattr(net[0], "parametrizations")  # inside the excluded outer Sequential
    net = nn.ModuleDict({"keep": nn.Linear(2, 2), "skip": nn.Sequential(nn.Linear(2, 2))})
    apply_spectral_norm(net, exclude=(nn.Sequential,))
    assert hasattr(net["keep"], "parametrizations")
    assert not hasattr(net["skip"][0], "parametrizations")
