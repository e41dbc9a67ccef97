"""Explanation maps: checked against independent computations, not just their shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cxrvit.inference import heatmaps as hm
from cxrvit.model.vit import VisionTransformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # Small but complete: 3 blocks, 4 heads, 5 outputs; 48 px input -> a 3 x 3 patch grid.
    return VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=5).eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 48, 48)


def test_cls_attention_is_the_last_blocks_cls_row(model, x):
    heads = hm.cls_attention(model, x)
    assert heads.shape == (2, 4, 3, 3)
    full = model.get_last_selfattention(x)
    torch.testing.assert_close(heads.flatten(2), full[:, :, 0, 1:])
    # together with the CLS->CLS entry each head's row is a probability distribution
    torch.testing.assert_close(heads.sum(dim=(2, 3)) + full[:, :, 0, 0], torch.ones(2, 4))


def rollout_by_loop(model, x, readout) -> np.ndarray:
    """Attention rollout written out plainly; ``readout`` picks the row(s) of the final product."""
    with torch.no_grad():
        maps = [a.mean(1).double().numpy() for a in model.get_all_selfattentions(x)]
    n = maps[0].shape[-1]
    expected = []
    for b in range(x.shape[0]):
        r = np.eye(n)
        for a in maps:
            a = 0.5 * a[b] + 0.5 * np.eye(n)
            a = a / a.sum(axis=1, keepdims=True)
            r = a @ r
        expected.append(readout(r).reshape(3, 3))
    return np.stack(expected)


def test_rollout_matches_a_plain_loop(model, x):
    expected = rollout_by_loop(model, x, lambda r: r[0, 1:])
    np.testing.assert_allclose(hm.attention_rollout(model, x).numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_a_mean_pooled_head_gets_the_attention_into_its_pooled_output(model, x, pool):
    """global_pool=avg (and avgmax, whose max has no attention row): the head reads the mean of the patch
    tokens, so both attention maps follow the mean of the patch rows instead of the CLS row (same backbone,
    another read-out)."""
    avg = VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=5,
                            global_pool=pool).eval()
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head")}
    assert avg.load_state_dict(backbone, strict=False).missing_keys == ["head.weight", "head.bias"]
    full = avg.get_last_selfattention(x)
    torch.testing.assert_close(hm.cls_attention(avg, x).flatten(2), full[:, :, 1:, 1:].mean(2))
    expected = rollout_by_loop(avg, x, lambda r: r[1:, 1:].mean(0))
    np.testing.assert_allclose(hm.attention_rollout(avg, x).numpy(), expected, rtol=1e-5)
    assert not np.allclose(hm.attention_rollout(avg, x).numpy(), hm.attention_rollout(model, x).numpy())
    cam = hm.grad_cam(avg, x, 2)          # the head's gradient reaches the patches through the mean (and the max)
    assert cam.shape == (x.shape[0], 3, 3) and torch.isfinite(cam).all() and (cam >= 0).all() and cam.sum() > 0


def test_a_cls_and_mean_head_gets_the_average_of_both_attention_rows(model, x):
    """global_pool=token+avg: the head reads the CLS token and the patch mean, so the maps average the CLS row
    and the mean of the patch rows, one for each half of what it reads."""
    pair = VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=5,
                             global_pool="token+avg").eval()
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head")}
    assert pair.load_state_dict(backbone, strict=False).missing_keys == ["head.weight", "head.bias"]
    full = pair.get_last_selfattention(x)
    torch.testing.assert_close(hm.cls_attention(pair, x).flatten(2),
                               0.5 * (full[:, :, 0, 1:] + full[:, :, 1:, 1:].mean(2)))
    expected = rollout_by_loop(pair, x, lambda r: 0.5 * (r[0, 1:] + r[1:, 1:].mean(0)))
    np.testing.assert_allclose(hm.attention_rollout(pair, x).numpy(), expected, rtol=1e-5)
    cam = hm.grad_cam(pair, x, 2)         # the head's gradient reaches the patches through both halves
    assert cam.shape == (x.shape[0], 3, 3) and torch.isfinite(cam).all() and (cam >= 0).all() and cam.sum() > 0


@pytest.mark.parametrize("pool", ["token", "avg", "avgmax", "token+avg"])
def test_gradcam_matches_a_manual_gradient(model, x, pool):
    """For each read-out (the product's is ``avg``), the gradient the head sends back through the last block,
    by hand."""
    if pool != "token":
        torch.manual_seed(2)
        head = VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=5,
                                 global_pool=pool).eval()
        head.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head")},
                             strict=False)
        model = head
    readout = {"token": lambda f: f[:, 0], "avg": lambda f: f[:, 1:].mean(1),
               "avgmax": lambda f: torch.cat((f[:, 1:].mean(1), f[:, 1:].amax(1)), -1),
               "token+avg": lambda f: torch.cat((f[:, 0], f[:, 1:].mean(1)), -1)}[pool]
    target = 3
    cam = hm.grad_cam(model, x, target)
    # Independent path: run the network by hand from the tokens entering the last block.
    with torch.no_grad():
        t = model.prepare_tokens(x)
        for blk in model.blocks[:-1]:
            t = blk(t)
    last = model.blocks[-1]
    z = last.norm1(t).detach().requires_grad_(True)
    h = t + last.attn(z)
    h = h + last.mlp(last.norm2(h))
    logit = model.head(readout(model.norm(h)))[:, target].sum()
    (g,) = torch.autograd.grad(logit, z)
    expected = torch.relu((z[:, 1:] * g[:, 1:].mean(1, keepdim=True)).sum(-1)).reshape(2, 3, 3)
    torch.testing.assert_close(cam, expected.detach(), rtol=1e-4, atol=1e-6)
    assert cam.max() > 0
    assert not torch.allclose(cam, hm.grad_cam(model, x, 0))  # depends on the label
    assert all(p.grad is None for p in model.parameters())    # leaves no gradients behind


def test_explain_and_overlay(model, x, tmp_path):
    maps = hm.explain(model, x, [0, 4], per_head=True)
    assert set(maps) == {"attention", "rollout", "gradcam"} | {f"attention_head{i}" for i in range(4)}
    for m in maps.values():
        assert m.shape == (2, 48, 48) and m.min() == pytest.approx(0) and m.max() == pytest.approx(1)
    grey = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    caption = hm.caption_for({"Effusion": 0.9, "Mass": 0.2}, ["Effusion"], "Effusion", ["lateral_view"])
    assert "findings: Effusion" in caption and "Effusion 0.90" in caption and "QC: lateral_view" in caption
    out = hm.save_overlay(tmp_path / "o.png", grey, {k: maps[k][0] for k in hm.METHODS}, caption)
    with Image.open(out) as im:
        assert im.size == (1200, 390)  # 4 panels of 3 in x 3.9 in at 100 dpi
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
