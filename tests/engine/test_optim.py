"""The one schedule convention and the one parameter-group rule (supervised and SSL alike)."""
import math

import pytest
import torch

from cxrvit.engine.optim import apply_schedule, build_adamw, param_groups, warmup_cosine
from cxrvit.model.vit import VisionTransformer
from cxrvit.ssl.config import config_from_dict
from cxrvit.ssl.pretrain import build_method


def tiny_dino():
    return config_from_dict({"method": "dino", "model": {"arch": "vit_tiny", "depth": 2, "patch_size": 8},
                             "dino": {"global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 32,
                                      "hidden_dim": 32, "bottleneck_dim": 16}})


def test_warmup_then_cosine():
    # Step s of a warm-up of 10 is at (s + 1) / 10: the first step learns, step 9 is at the peak.
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == 0.1
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == 1.0
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == 1.0                 # the cosine starts at the peak
    assert math.isclose(warmup_cosine(55, 100, 10, 1.0, 0.0), 0.5)     # half-way down the cosine
    assert math.isclose(warmup_cosine(100, 100, 10, 1.0, 0.01), 0.01)
    assert warmup_cosine(500, 100, 10, 1.0, 0.01) == warmup_cosine(100, 100, 10, 1.0, 0.01)  # past the end: final
    assert all(warmup_cosine(s, 100, 10, 1.0, 0.0) >= warmup_cosine(s + 1, 100, 10, 1.0, 0.0) for s in range(10, 99))


def test_without_warmup_it_is_a_plain_cosine_the_ssl_wd_and_momentum_schedules_use():
    assert math.isclose(warmup_cosine(0, 10, 0, 0.04, 0.4), 0.04)
    assert math.isclose(warmup_cosine(5, 10, 0, 0.04, 0.4), 0.22)
    assert math.isclose(warmup_cosine(10, 10, 0, 0.996, 1.0), 1.0)


def small_vit(depth=3):
    torch.manual_seed(0)
    return VisionTransformer(embed_dim=48, depth=depth, num_heads=3, num_classes=2)


def test_vit_groups_skip_no_weight_decay_and_scale_lr_by_layer():
    model = small_vit()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.5 ** 4
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** 3 and scale["blocks.2.mlp.fc1.weight"] == 0.5
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["head.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == decay["norm.weight"] == decay["pos_embed"] == decay["cls_token"] == 0.0
    assert all(g["apply_wd"] == (g["weight_decay"] > 0) for g in groups)


def test_ssl_method_groups_follow_dinos_rule_and_leave_the_teacher_out():
    method = build_method(tiny_dino())
    groups = param_groups(method, weight_decay=0.04)
    assert [g["apply_wd"] for g in groups] == [True, False]
    decayed, not_decayed = set(groups[0]["param_names"]), set(groups[1]["param_names"])
    # No no_weight_decay on a method: every matrix decays, the CLS token included (DINO's reference code).
    assert "student.cls_token" in decayed and "student.blocks.0.attn.qkv.bias" in not_decayed
    assert not any(n.startswith("teacher") for n in decayed | not_decayed)   # frozen EMA teacher
    # Exactly the groups the pre-training loop built before the shared engine (decay first, then biases,
    # norms and other 1-d parameters, each in module order), so the optimizer steps are unchanged.
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]   # the teacher is frozen
    before = [[p for n, p in named if not (p.ndim <= 1 or n.endswith(".bias"))],
              [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]]
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in ps] for ps in before]
    with pytest.raises(ValueError, match="layer-wise lr decay needs a VisionTransformer"):
        param_groups(method, 0.04, layer_decay=0.75)


def test_apply_schedule_scales_lr_per_group_and_schedules_only_decaying_groups():
    model = small_vit(depth=2)
    opt = build_adamw(param_groups(model, 0.05, layer_decay=0.5), lr=1.0, betas=(0.9, 0.999),
                      device=torch.device("cpu"))
    apply_schedule(opt, 0.1, weight_decay=0.3)
    for g in opt.param_groups:
        assert math.isclose(g["lr"], 0.1 * g["lr_scale"])
        assert g["weight_decay"] == (0.3 if g["apply_wd"] else 0.0)
    apply_schedule(opt, 0.2)   # weight_decay=None: the constant decay stays
    assert {g["weight_decay"] for g in opt.param_groups} == {0.3, 0.0}
