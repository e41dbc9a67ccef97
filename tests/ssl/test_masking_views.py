import torch

from cxrvit.ssl.masking import MultiBlockMasker, random_masking
from cxrvit.ssl.views import Photometric, gaussian_blur, random_resized_crop


def test_random_masking_partitions_the_grid():
    keep, masked = random_masking(3, 196, 0.9, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 19) and masked.shape == (3, 177)   # MAE's int(L * (1 - r)): floor, not round
    for k, m in zip(keep, masked):
        assert sorted(torch.cat((k, m)).tolist()) == list(range(196))


def test_random_masking_keeps_maes_floor_of_the_visible_count():
    gen = torch.Generator().manual_seed(0)
    # (patches, ratio) -> MAE's len_keep = int(L * (1 - mask_ratio)); at least one patch stays visible
    for n, ratio, visible in ((196, 0.75, 49), (196, 0.9, 19), (64, 0.75, 16), (64, 0.9, 6), (4, 0.9, 1)):
        keep, masked = random_masking(2, n, ratio, gen)
        assert keep.shape == (2, visible) and masked.shape == (2, n - visible), (n, ratio)


def test_multiblock_context_never_sees_a_target():
    masker = MultiBlockMasker(grid=14)
    ctx, tgt = masker(5, torch.Generator().manual_seed(1))
    assert tgt.shape[:2] == (5, 4) and ctx.shape[0] == 5
    n_tgt = tgt.shape[2]
    assert 0.1 * 196 <= n_tgt <= 0.3 * 196          # target_scale (0.15, 0.2) after rounding
    for c, t in zip(ctx, tgt):
        assert not set(c.tolist()) & set(t.flatten().tolist())
        assert len(set(c.tolist())) == len(c)          # no duplicate context tokens


def test_full_crop_is_the_image_and_flip_mirrors_it():
    x = torch.rand(2, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    same = random_resized_crop(x, 32, (1.0, 1.0), (1.0, 1.0), g)
    assert torch.allclose(same, x, atol=1e-5)
    flipped = random_resized_crop(x, 32, (1.0, 1.0), (1.0, 1.0), g, hflip=1.0)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)


def test_blur_keeps_flat_images_and_smooths_edges():
    x = torch.zeros(2, 1, 16, 16)
    x[:, :, :, 8:] = 1.0
    y = gaussian_blur(x, torch.tensor([2.0, 2.0]), torch.tensor([True, False]))
    assert torch.equal(y[1], x[1])                     # not applied: untouched
    assert 0.0 < y[0, 0, 8, 7] < 0.5 < y[0, 0, 8, 8] < 1.0
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.5]), torch.tensor([True])), flat, atol=1e-6)


def test_photometric_stays_in_range_and_varies_per_sample():
    x = torch.rand(8, 1, 16, 16)
    y = Photometric(jitter_p=1.0, solarize_p=0.5)(x, torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1
    assert len({round(float(v), 4) for v in (y - x).abs().mean(dim=(1, 2, 3))}) == 8


def test_multiblock_keeps_context_on_a_tiny_grid():
    # 4 targets of 15-20% on a 4x4 grid can cover everything; targets are re-drawn until context survives.
    masker = MultiBlockMasker(grid=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ctx, tgt = masker(16, g)
        assert ctx.shape[1] >= masker.min_context
        for c, t in zip(ctx, tgt):
            assert not set(c.tolist()) & set(t.flatten().tolist())
