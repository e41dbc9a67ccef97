import pytest
import torch

from cxrvit.training.augment import BatchAugment
from cxrvit.training.config import AugmentConfig

IDENTITY = dict(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0)


def _images(b=4, s=48, seed=0):
    return torch.randint(0, 256, (b, 1, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_identity_settings_reproduce_the_resized_image():
    x = _images(s=32)
    out, _ = BatchAugment(AugmentConfig(**IDENTITY), out_size=32)(x)
    assert out.shape == (4, 1, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, x.float() / 255, atol=1e-5)


def test_flip_probability_one_mirrors_every_image():
    x = _images(s=32)
    out, _ = BatchAugment(AugmentConfig(**{**IDENTITY, "hflip": 1.0}), out_size=32)(x)
    assert torch.allclose(out, x.float().flip(-1) / 255, atol=1e-5)


def test_full_augmentation_shapes_range_and_variation():
    cfg = AugmentConfig(scale=[0.6, 1.0], rotate=10, translate=0.05, shear=5, brightness=0.1, contrast=0.2, gamma=0.25)
    x = _images(b=8, s=64)
    out, _ = BatchAugment(cfg, out_size=32)(x)
    assert out.shape == (8, 1, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
    same = _images(b=1, s=64).expand(8, -1, -1, -1)
    views, _ = BatchAugment(cfg, out_size=32)(same)
    assert (views[1:] - views[:1]).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every sample has its own params


def test_generator_state_reproduces_the_same_draws():
    cfg = AugmentConfig(scale=[0.5, 1.0], rotate=10, contrast=0.2)
    aug = BatchAugment(cfg, 32, seed=3)
    x = _images()
    aug(x)
    state = aug.state_dict()
    a, _ = aug(x)
    other = BatchAugment(cfg, 32, seed=99)
    other.load_state_dict(state)
    b, _ = other(x)
    assert torch.equal(a, b)


def test_rank_share_of_a_global_draw_matches_the_global_batch():
    cfg = AugmentConfig(scale=[0.5, 1.0], rotate=10, gamma=0.3, hflip=0.5)
    x = _images(b=6)
    full, _ = BatchAugment(cfg, 32, seed=1)(x)
    for rank in range(2):
        part, _ = BatchAugment(cfg, 32, seed=1)(x[rank::2], draw=6, take=slice(rank, 6, 2))
        assert torch.allclose(part, full[rank::2], atol=1e-6)


def test_mixup_mixes_targets_with_the_image_weight():
    cfg = AugmentConfig(**IDENTITY, mixup=0.4, mix_prob=1.0)
    x = _images(b=6, s=32)
    y = torch.eye(6)
    out, ym = BatchAugment(cfg, 32, seed=0)(x, y)
    # one-hot rows mixed with weights lam and 1 - lam still sum to one; images were mixed too
    assert torch.allclose(ym.sum(1), torch.ones(6)) and not torch.equal(ym, y)
    assert not torch.allclose(out, x.float() / 255)
    cut = AugmentConfig(**IDENTITY, cutmix=1.0, mix_prob=1.0)
    _, yc = BatchAugment(cut, 32, seed=0)(x, torch.ones(6, 2))
    assert torch.allclose(yc, torch.ones(6, 2))  # mixing two positives stays positive


def test_crop_boxes_are_the_one_crop_both_the_augmentation_and_the_ssl_views_draw():
    import math

    from cxrvit.ssl.views import random_resized_crop
    from cxrvit.training.augment import crop_boxes

    w, h, cx, cy = crop_boxes(4000, (0.3, 0.9), (0.75, 4 / 3), torch.Generator().manual_seed(0), torch.float64)
    # inside the image, area in the scale range unless a side was clamped to the image, aspect in the ratio range
    assert bool(((cx.abs() + w <= 1 + 1e-12) & (cy.abs() + h <= 1 + 1e-12)).all())
    free = (w < 1) & (h < 1)
    assert bool(((w * h)[free] >= 0.3 - 1e-9).all() and ((w * h)[free] <= 0.9 + 1e-9).all())
    assert bool(((w / h)[free] >= 0.75 - 1e-9).all() and ((w / h)[free] <= 4 / 3 + 1e-9).all())
    assert float(cx.mean()) == pytest.approx(0.0, abs=0.02) and math.isclose(float((w * h).max()), 0.9, abs_tol=0.01)
    # the SSL crop is this box (float32 draws from the same generator), no flip: a crop of a horizontal ramp
    # spans exactly [cx - w, cx + w] of the image's normalised width
    ramp = torch.linspace(-1, 1, 256).repeat(2, 1, 256, 1)
    out = random_resized_crop(ramp, 8, (0.3, 0.9), (0.75, 4 / 3), torch.Generator().manual_seed(5))
    w, h, cx, cy = crop_boxes(2, (0.3, 0.9), (0.75, 4 / 3), torch.Generator().manual_seed(5))
    left, right = out[:, 0, 0, 0], out[:, 0, 0, -1]     # pixel centres at -7/8 and +7/8 of the crop
    assert torch.allclose(left, cx - w * 7 / 8, atol=0.01) and torch.allclose(right, cx + w * 7 / 8, atol=0.01)
