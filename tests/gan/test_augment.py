import pytest
import torch

from gan.augment import POLICIES, color, cutout, diff_augment, translation


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_same_seed_same_transform_and_different_seed_differs():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    a = diff_augment(x, POLICIES, seeded(1))
    b = diff_augment(x, POLICIES, seeded(1))
    c = diff_augment(x, POLICIES, seeded(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_translation_moves_content_by_at_most_an_eighth():
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    out = translation(x, seeded())
    assert torch.all(out.sum(dim=(1, 2, 3)) == 1)  # 2 px max shift keeps the dot inside
    positions = out[:, 0].flatten(1).argmax(dim=1)
    rows, cols = positions // 16, positions % 16
    assert (rows - 8).abs().max() <= 2 and (cols - 8).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1  # samples differ


def test_translation_is_the_same_for_every_channel():
    x = torch.rand(4, 3, 16, 16)
    x[:, 1] = x[:, 0]
    out = translation(x, seeded())
    torch.testing.assert_close(out[:, 0], out[:, 1])


def test_cutout_zeroes_a_half_size_square_per_sample():
    x = torch.ones(16, 3, 16, 16)
    out = cutout(x, seeded())
    zeroed = (out[:, 0] == 0).flatten(1).sum(dim=1)
    assert zeroed.max() == 64  # 8x8 square when fully inside
    assert zeroed.min() > 0
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_color_shifts_brightness_per_sample():
    x = torch.zeros(32, 3, 4, 4)
    out = color(x, seeded())
    per_sample = out.mean(dim=(1, 2, 3))
    assert per_sample.abs().max() <= 0.5 + 1e-6
    assert per_sample.std() > 0.05


def test_gradients_flow_through_every_policy():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    out = diff_augment(x, POLICIES, seeded())
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_empty_policy_is_identity_and_unknown_policy_fails():
    x = torch.rand(2, 1, 8, 8)
    assert diff_augment(x, (), seeded()) is x
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        diff_augment(x, ["colour"])
