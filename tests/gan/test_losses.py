import math

import pytest
import torch

from gan.losses import LOSSES, get_loss

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bce_matches_cross_entropy_by_hand():
    d = (
        sum(
            -math.log(_sigmoid(r)) - math.log(1 - _sigmoid(f))
            for r, f in zip([2, -1], [0.5, -3], strict=True)
        )
        / 2
    )
    g = sum(-math.log(_sigmoid(f)) for f in [0.5, -3]) / 2
    assert LOSSES["bce"].d_loss(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    assert LOSSES["bce"].g_loss(FAKE).item() == pytest.approx(g, rel=1e-6)


def test_lsgan_by_hand():
    d = 0.5 * (((2 - 1) ** 2 + 0.5**2) + ((-1 - 1) ** 2 + 3**2)) / 2
    g = 0.5 * ((0.5 - 1) ** 2 + (-3 - 1) ** 2) / 2
    assert LOSSES["lsgan"].d_loss(REAL, FAKE).item() == pytest.approx(d)
    assert LOSSES["lsgan"].g_loss(FAKE).item() == pytest.approx(g)


def test_hinge_by_hand():
    # real: max(0, 1-2)=0, max(0, 1+1)=2; fake: max(0, 1+0.5)=1.5, max(0, 1-3)=0
    assert LOSSES["hinge"].d_loss(REAL, FAKE).item() == pytest.approx((0 + 2 + 1.5 + 0) / 2)
    assert LOSSES["hinge"].g_loss(FAKE).item() == pytest.approx(1.25)


def test_wasserstein_by_hand():
    assert LOSSES["wasserstein"].d_loss(REAL, FAKE).item() == pytest.approx(-1.25 - 0.5)
    assert LOSSES["wasserstein"].g_loss(FAKE).item() == pytest.approx(1.25)


def test_bce_is_stable_for_huge_logits():
    big = torch.tensor([1e4])
    assert torch.isfinite(LOSSES["bce"].d_loss(big, -big))
    assert LOSSES["bce"].d_loss(big, -big).item() == pytest.approx(0.0)
    assert LOSSES["bce"].g_loss(-big).item() == pytest.approx(1e4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_generator_loss_falls_as_fakes_look_real(name):
    loss = get_loss(name)
    assert loss.g_loss(torch.full((4,), 1.0)) < loss.g_loss(torch.full((4,), -1.0))


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ValueError, match="hinge"):
        get_loss("hingee")
