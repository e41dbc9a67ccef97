"""Each objective learns: on one fixed batch (fixed views and masks) the loss falls in a few steps."""
import pytest
import torch

from cxrvit.engine.optim import param_groups
from cxrvit.ssl.pretrain import build_method
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
