"""Each objective learns: on one fixed batch (fixed views and masks) the loss falls in a few steps."""
import math

import pytest
import torch

from cxrvit.engine.core import Engine
from cxrvit.engine.optim import param_groups
from cxrvit.ssl import ijepa
from cxrvit.ssl.encoder import build_encoder
from cxrvit.ssl.pretrain import build_method, pretrain
from sslfakes import tiny_config


@pytest.mark.parametrize("method", ["dino", "mae", "ijepa"])
def test_loss_falls_on_a_fixed_batch(method, tiny_cache):
    torch.manual_seed(0)
    cfg = tiny_config(method)
    m = build_method(cfg)
    m.train()
    x = torch.from_numpy(tiny_cache.pixels[:8]).unsqueeze(1).float().div(255)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    inputs = m.make_inputs(x, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(m, weight_decay=0.01), lr=1e-3 if method != "dino" else 3e-4)
    losses = []
    for step in range(12):
        # DINO: a fixed, sharp teacher, so the student's target is stationary on this batch.
        loss, metrics = m(*inputs, **m.step_kwargs(0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if m.momentum_base is not None:
            m.after_step(0.999)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses


def test_teacher_is_frozen_and_follows_the_student_by_ema():
    m = build_method(tiny_config("dino"))
    assert not any(p.requires_grad for p in m.teacher.parameters())
    s0 = m.teacher.cls_token.clone()
    with torch.no_grad():
        m.student.cls_token.add_(1.0)
    m.after_step(0.9)
    assert torch.allclose(m.teacher.cls_token, s0 + 0.1, atol=1e-6)


def test_dino_teacher_temperature_warms_up():
    m = build_method(tiny_config("dino", dino={"warmup_teacher_temp_epochs": 10}))
    assert m.step_kwargs(0.0)["teacher_temp"] == pytest.approx(0.04)
    assert m.step_kwargs(5.0)["teacher_temp"] == pytest.approx(0.055)
    assert m.step_kwargs(20.0)["teacher_temp"] == pytest.approx(0.07)


def test_mae_encoder_sees_only_visible_tokens(tiny_cache):
    m = build_method(tiny_config("mae", mae={"mask_ratio": 0.75}))
    seen = []
    m.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape[1]))
    x = torch.rand(2, 1, 32, 32)
    m(*m.make_inputs(x, torch.Generator().manual_seed(0)))
    assert seen == [1 + 4]   # CLS + 25% of the 16 patches


@pytest.mark.parametrize("method", ["dino", "mae", "ijepa"])
def test_model_attention_setting_reaches_every_block(method):
    """``--set model.attention=...`` covers the encoder and the decoder / predictor / teacher blocks."""
    from cxrvit.model.vit import Attention
    from cxrvit.ssl.config import apply_overrides, config_from_dict, config_to_dict

    cfg = config_from_dict(apply_overrides(config_to_dict(tiny_config(method)), ["model.attention=explicit"]))
    m = build_method(cfg)
    paths = {mod.attention for mod in m.modules() if isinstance(mod, Attention)}
    assert paths == {"explicit"}
    cfg.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention"):
        cfg.validate()


def test_foreach_ema_update_is_bit_identical_to_the_per_parameter_loop():
    import copy

    from cxrvit.ssl.encoder import ema_update

    torch.manual_seed(0)
    student = build_method(tiny_config("dino")).student
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = {n: p.detach().clone().mul_(0.996).add_(dict(student.named_parameters())[n].detach(), alpha=0.004)
                for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.996)
    assert all(torch.equal(p, expected[n]) for n, p in teacher.named_parameters())


def test_dino_clips_each_parameter_and_mae_ijepa_the_global_norm(tiny_cache, tmp_path, monkeypatch):
    """What the loop hands the engine's clipping step: DINO's utils.clip_gradients is per parameter."""
    seen = []
    step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self, params, clip, measure=False, clip_mode="global":
                        seen.append((clip, clip_mode)) or step(self, params, clip, measure, clip_mode))
    for method, mode in (("dino", "per_param"), ("mae", "global"), ("ijepa", "global")):
        seen.clear()
        cfg = tiny_config(method, optim={"clip_grad": 3.0}, schedule={"epochs": 1, "batch_size": 16, "max_steps": 1})
        pretrain(cfg, [tiny_cache], tmp_path / method, quiet=True)
        assert seen == [(3.0, mode)], method


def test_ijepa_rescales_residual_outputs_by_depth_and_dino_mae_do_not(monkeypatch):
    """I-JEPA's fix_init_weight: blocks' attn.proj and mlp.fc2 weights / sqrt(2 * layer_id), in the context
    encoder (hence the target encoder, its copy) and the predictor; DINO's and MAE's encoders keep the ViT init."""
    cfg = tiny_config("ijepa", model={"depth": 3}, ijepa={"predictor_depth": 2})
    torch.manual_seed(0)
    fixed = dict(build_method(cfg).named_parameters())
    monkeypatch.setattr(ijepa, "fix_init_weight", lambda blocks: None)
    torch.manual_seed(0)
    plain = dict(build_method(cfg).named_parameters())
    rescaled = 0
    for name, w in fixed.items():
        parts = name.split(".")
        if parts[0] in ("context_encoder", "target_encoder", "predictor") and parts[-2] in ("proj", "fc2") \
                and parts[1] == "blocks" and parts[-1] == "weight":
            assert torch.equal(w, plain[name] / math.sqrt(2.0 * (int(parts[2]) + 1))), name
            rescaled += 1
        else:
            assert torch.equal(w, plain[name]), name
    assert rescaled == 2 * (3 + 3 + 2)
    for method in ("dino", "mae"):   # the shared encoder: untouched for them
        torch.manual_seed(0)
        other = build_method(tiny_config(method, model={"depth": 3}))
        torch.manual_seed(0)
        ref = build_encoder("vit_tiny", depth=3, patch_size=8)
        enc = other.student if method == "dino" else other.encoder
        assert torch.equal(enc.blocks[2].mlp.fc2.weight, ref.blocks[2].mlp.fc2.weight), method


def test_ijepa_momentum_is_linear_to_one_over_1_25x_the_run_and_dino_keeps_the_cosine():
    total = 1000
    ij, dino = build_method(tiny_config("ijepa")), build_method(tiny_config("dino"))
    ref = [0.996 + s * (1.0 - 0.996) / (total * 1.25) for s in range(total)]   # I-JEPA's src/train.py
    assert all(math.isclose(ij.momentum_at(s, total), ref[s], rel_tol=0, abs_tol=1e-12) for s in range(total))
    assert math.isclose(ij.momentum_at(total - 1, total), 0.9992, abs_tol=1e-5)
    assert math.isclose(dino.momentum_at(0, total), 0.996) and dino.momentum_at(total - 1, total) > 0.99999
    assert math.isclose(dino.momentum_at(total // 2, total), 0.998, abs_tol=1e-5)   # cosine midpoint
