"""The ViT itself: DINO's exact state_dict, forward semantics, attention paths, helpers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cxrvit.data.preprocess import Preprocessing
from cxrvit.model.vit import (VisionTransformer, drop_path, fold_patch_embed_to_grey, layer_id_for,
                              dino_resample_pos_embed, sincos_pos_embed, vit_small)
from dino_reference import dino_vit_small


# The full manifest of DINO's vit_small (150 backbone keys) plus a 3-label head, in state_dict order.
BLOCK_MANIFEST = [
    ("norm1.weight", (384,)), ("norm1.bias", (384,)),
    ("attn.qkv.weight", (1152, 384)), ("attn.qkv.bias", (1152,)),
    ("attn.proj.weight", (384, 384)), ("attn.proj.bias", (384,)),
    ("norm2.weight", (384,)), ("norm2.bias", (384,)),
    ("mlp.fc1.weight", (1536, 384)), ("mlp.fc1.bias", (1536,)),
    ("mlp.fc2.weight", (384, 1536)), ("mlp.fc2.bias", (384,)),
]
MANIFEST = (
    [("cls_token", (1, 1, 384)), ("pos_embed", (1, 197, 384)),
     ("patch_embed.proj.weight", (384, 3, 16, 16)), ("patch_embed.proj.bias", (384,))]
    + [(f"blocks.{i}.{name}", shape) for i in range(12) for name, shape in BLOCK_MANIFEST]
    + [("norm.weight", (384,)), ("norm.bias", (384,)), ("head.weight", (3, 384)), ("head.bias", (3,))]
)


def small(depth: int = 2, **kw) -> VisionTransformer:
    """A narrow ViT for tests where the full ViT-S is not the point (same code path)."""
    torch.manual_seed(0)
    return VisionTransformer(embed_dim=48, depth=depth, num_heads=3, **kw).eval()


@pytest.fixture(scope="module")
def vits():
    torch.manual_seed(0)
    return vit_small(num_classes=3).eval()


@pytest.fixture(scope="module")
def dino_ref():
    return dino_vit_small(num_classes=3).eval()


def test_state_dict_is_dinos_manifest(vits, dino_ref):
    got = [(k, tuple(v.shape)) for k, v in vits.state_dict().items()]
    assert len(MANIFEST) == 152
    assert got == MANIFEST
    assert [(k, tuple(v.shape)) for k, v in dino_ref.state_dict().items()] == MANIFEST


@pytest.mark.parametrize("size", [224, 96, 128, 160, 448])
def test_forward_matches_independent_dino(vits, size):
    """At DINO's native 224 px and at the sizes the project reads (96-px DINO crops, the 128/160-px caches, 448 px):
    the position table is resampled by DINO's own rule, scale factor with its +0.1 (a plain size= resampling
    moved the CLS features of a sin-cos ViT-S/16 by up to 6.5e-2 at 96 px: docs/model.md)."""
    vits, ref = copy.deepcopy(vits), dino_vit_small(num_classes=3).eval()   # the shared fixtures stay as built
    ref.load_state_dict(vits.state_dict(), strict=True)
    with torch.no_grad():
        ref.pos_embed.normal_(std=0.3)       # a table with structure: a random init's 0.02 hides resampling errors
        vits.pos_embed.copy_(ref.pos_embed)
        x = torch.randn(2, 3, size, size)
        ours, theirs = vits(x), ref.head(ref(x))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_explicit_softmax(vits):
    """The fused SDPA path and the explicit-softmax path agree to 1e-5 (fp32)."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = vits.forward_features(x)
        t = vits.prepare_tokens(x)
        for blk in vits.blocks:
            t, _ = blk(t, return_attention=True)
        explicit = vits.norm(t)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_last_selfattention_shape_and_rows(vits):
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        attn = vits.get_last_selfattention(x)
    n = (64 // 16) * (48 // 16)
    assert attn.shape == (2, 6, n + 1, n + 1)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6, n + 1))


@pytest.mark.parametrize("h,w", [(512, 512), (448, 320)])
def test_interpolate_pos_encoding(h, w):
    model = small(depth=1)
    gh, gw = h // 16, w // 16
    tokens = torch.zeros(1, 1 + gh * gw, 48)
    pos = model.interpolate_pos_encoding(tokens, h, w)
    assert pos.shape == (1, 1 + gh * gw, 48)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])  # the CLS position is never resampled
    # bicubic resampling of a constant table is constant: checks the row/column layout is kept
    const = torch.ones(1, 197, 48)
    torch.testing.assert_close(dino_resample_pos_embed(const, gh, gw), torch.ones(1, 1 + gh * gw, 48))
    # a left-to-right ramp stays a left-to-right ramp (rows and columns not swapped for non-square)
    ramp = torch.arange(14.0).repeat(14).view(1, 196, 1).expand(1, 196, 48)
    out = dino_resample_pos_embed(torch.cat((torch.zeros(1, 1, 48), ramp), 1), gh, gw)[0, 1:, 0].view(gh, gw)
    assert torch.all(out[:, 1:] >= out[:, :-1] - 1e-5) and torch.allclose(out[0], out[-1])
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, h, w))
    assert feats.shape == (1, 1 + gh * gw, 48)


def test_native_size_uses_stored_table_and_bad_size_raises():
    model = small(depth=1)
    assert model.interpolate_pos_encoding(torch.zeros(1, 197, 48), 224, 224) is model.pos_embed
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 60, 64))


def test_intermediate_layers_and_forward_api():
    model = small(depth=4, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n=3)
        feats = model.forward_features(x)
        logits = model(x)
    assert len(layers) == 3 and all(t.shape == (2, 5, 48) for t in layers)
    torch.testing.assert_close(layers[-1], feats)
    assert not torch.allclose(layers[0], layers[1])
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
    torch.testing.assert_close(logits, model.head(feats[:, 0]))


def test_no_weight_decay_and_layer_ids():
    # the parameter groups built from these are tested in tests/engine/test_optim.py
    model = small(depth=3, num_classes=2)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert [layer_id_for(n, 3) for n in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                                         "blocks.2.mlp.fc1.weight", "norm.weight", "head.weight")] == [0, 0, 1, 3, 4, 4]


def test_drop_path_and_dropout():
    x = torch.ones(4000, 3, 8)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    # whole samples dropped, survivors rescaled by 1 / keep
    assert torch.allclose(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert torch.all(y == y[:, :1, :1])
    assert abs((per_sample == 0).float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    model = small(depth=4, drop_path_rate=0.3, drop_rate=0.1)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.3) < 1e-6 and rates == sorted(rates)
    inp = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model.forward_features(inp), model.forward_features(inp))
    model.eval()
    torch.testing.assert_close(model.forward_features(inp), model.forward_features(inp))


def test_dino_initialisation(vits):
    model = vits
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert model.blocks[0].mlp.fc1.bias.abs().max() == 0 and torch.all(model.norm.weight == 1)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002


def test_sincos_pos_embed_init_keeps_the_state_dict():
    random_start, sincos_start = vit_small(num_classes=3), vit_small(num_classes=3, pos_embed="sincos")
    assert [(k, v.shape) for k, v in sincos_start.state_dict().items()] == MANIFEST
    table = sincos_start.pos_embed.detach()
    torch.testing.assert_close(table, sincos_pos_embed(384, 14))
    assert torch.all(table[0, 0] == 0)                         # the CLS position carries no position
    assert table[0, 1:].abs().max() <= 1 and table[0, 1:].std() > 0.5     # as loud as the patch tokens
    assert sincos_start.pos_embed.requires_grad                # a starting value, not a frozen table
    assert abs(random_start.pos_embed.std().item() - 0.02) < 0.002
    with pytest.raises(ValueError, match="pos_embed"):
        vit_small(pos_embed="learned")


def test_sincos_positions_let_a_frozen_random_vit_say_where():
    """A bright square on the left vs the right half, identical pixels otherwise: with DINO's random
    positions (std 0.02) an untrained ViT is a bag of patches and a linear probe on its CLS is at chance;
    with the sin-cos table the same untrained ViT tells the sides apart (why `improved` starts from it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    g = torch.Generator().manual_seed(0)
    n = 200
    x = torch.rand(n, 1, 64, 64, generator=g) * 0.2
    side = torch.arange(n) % 2
    for i in range(n):                                          # square on the patch grid: same patch contents
        r = int(torch.randint(0, 4, (1,), generator=g)) * 16
        c = int(torch.randint(0, 2, (1,), generator=g)) * 16 + 32 * int(side[i])
        x[i, :, r:r + 16, c:c + 16] += 0.8

    def probe_auroc(pos_embed: str) -> float:
        torch.manual_seed(0)
        model = VisionTransformer(img_size=64, embed_dim=48, depth=2, num_heads=3, pos_embed=pos_embed).eval()
        with torch.no_grad():
            f = model.forward_features(x)[:, 0].numpy()
        f = (f - f.mean(0)) / (f.std(0) + 1e-6)
        p = cross_val_predict(LogisticRegression(max_iter=2000), f, side.numpy(), cv=5, method="predict_proba")
        return roc_auc_score(side.numpy(), p[:, 1])

    assert probe_auroc("sincos") > 0.9
    assert probe_auroc("random") < 0.7


def test_avg_pool_reads_the_mean_of_the_patch_tokens_and_keeps_dinos_state_dict():
    torch.manual_seed(0)
    token = small(num_classes=3)
    torch.manual_seed(0)
    avg = small(num_classes=3, global_pool="avg")
    assert token.state_dict().keys() == avg.state_dict().keys()          # no parameter depends on the read-out
    assert all(torch.equal(v, avg.state_dict()[k]) for k, v in token.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = avg.forward_features(x)
        np.testing.assert_allclose(avg.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1), atol=0)
        assert torch.equal(token.forward_head(feats, pre_logits=True), feats[:, 0])
        torch.testing.assert_close(avg(x), avg.head(feats[:, 1:].mean(1)))
        assert not torch.allclose(avg(x), token(x))
    with pytest.raises(ValueError, match="unknown global_pool 'max'"):
        small(global_pool="max")


def avg_and_paired_twins(pool: str, **kwargs):
    """A patch-mean model and a paired read-out (``pool``) drawn from the same seed: the same backbone, only the
    head twice as wide (the wider head's draw must not shift the backbone's)."""
    torch.manual_seed(0)
    avg = small(num_classes=3, global_pool="avg", **kwargs)
    torch.manual_seed(0)
    paired = small(num_classes=3, global_pool=pool, **kwargs)
    backbone = {k: v for k, v in avg.state_dict().items() if not k.startswith("head")}
    assert all(torch.equal(v, paired.state_dict()[k]) for k, v in backbone.items())
    d = avg.num_features
    assert paired.num_features == 2 * d and paired.head.weight.shape == (3, 2 * d)
    return avg, paired, d


def test_avgmax_reads_the_mean_and_the_max_of_the_patch_tokens_from_the_same_backbone():
    _, both, d = avg_and_paired_twins("avgmax")
    x = torch.randn(2, 3, 32, 32)
    x[1, :, :16, :16] += 5.0                      # one loud patch: the max sees it, the mean dilutes it
    with torch.no_grad():
        feats = both.forward_features(x)
        pooled = both.forward_head(feats, pre_logits=True)
        patches = feats[:, 1:]
        assert torch.equal(pooled[:, :d], patches.mean(1))
        assert torch.equal(pooled[:, d:], patches.max(dim=1).values)
        assert (pooled[:, d:] >= pooled[:, :d]).all() and (pooled[:, d:] > pooled[:, :d]).any()
        torch.testing.assert_close(both(x), both.head(pooled))


@pytest.mark.parametrize("blocks", [1, 2])
def test_token_avg_reads_the_cls_token_and_the_patch_mean_side_by_side(blocks):
    avg, pair, d = avg_and_paired_twins("token+avg", depth=3, n_last_blocks=blocks)   # d = blocks x embed_dim
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = pair.forward_features(x)
        pooled = pair.forward_head(feats, pre_logits=True)
        assert torch.equal(pooled[:, :d], feats[:, 0])
        assert torch.equal(pooled[:, d:], avg.forward_head(feats, pre_logits=True))
        torch.testing.assert_close(pair(x), pair.head(pooled))


def test_n_last_blocks_reads_each_of_the_last_blocks_pooled_side_by_side():
    one = small(depth=4, num_classes=3, global_pool="avg")
    four = small(depth=4, num_classes=3, global_pool="avg", n_last_blocks=4)
    d = one.embed_dim
    # the backbone is the same either way (same seed, same parameters); only the head is wider (4 x D)
    backbone = {k: v for k, v in one.state_dict().items() if not k.startswith("head")}
    assert all(torch.equal(v, four.state_dict()[k]) for k, v in backbone.items())
    assert four.num_features == 4 * d and four.head.weight.shape == (3, 4 * d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = four.forward_features(x)
        layers = four.get_intermediate_layers(x, n=4)      # DINO's own read of the last 4 blocks, oldest first
        assert feats.shape == (2, 5, 4 * d)
        torch.testing.assert_close(feats, torch.cat(layers, dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(feats[..., -d:], one.forward_features(x), rtol=0, atol=0)  # last = n=1's
        pooled = four.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, torch.cat([t[:, 1:].mean(1) for t in layers], dim=-1))
        assert four(x).shape == (2, 3)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"n_last_blocks {bad} must be in 1..4"):
            small(depth=4, n_last_blocks=bad)


def test_grey_fold_is_exact():
    """Folded 1-channel filter on raw grey == 3-channel filter on repeated, normalised grey."""
    model = small(depth=1)
    pre = Preprocessing(size=32)
    grey = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    conv = model.patch_embed.proj
    w1, b1 = fold_patch_embed_to_grey(conv.weight, conv.bias, pre.mean, pre.std)
    assert w1.shape == (48, 1, 16, 16) and b1.shape == (48,)
    folded = torch.nn.functional.conv2d(grey.float() / 255, w1, b1, stride=16)
    repeated = conv(pre.normalize(grey))
    torch.testing.assert_close(folded, repeated, atol=2e-5, rtol=1e-5)
    # a 1-channel input to the model is the same as repeating it to 3 channels
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), model.forward_features(x.repeat(1, 3, 1, 1)))
