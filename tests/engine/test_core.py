"""``Engine``: a loop built on it resumes bit-exactly, whatever it draws from which generator."""
import math

import pytest
import torch
from torch import nn

from cxrvit.engine.core import Engine, clip_grad_per_param_
from cxrvit.engine.distributed import DistContext, setup, wrap_ddp
from cxrvit.engine.optim import apply_schedule, param_groups, warmup_cosine
from cxrvit.model.vit import VisionTransformer

TOTAL = 6


def run(out, stop_at=None, resume=False, precision="fp32", seen=None):
    """A minimal loop in the engine's order: random data from a saved generator, drop-path from torch's."""
    engine = Engine(out, DistContext(), precision, seed=3)
    state = engine.open(resume, {"lr": 1e-2})
    if seen is not None:
        seen.append(engine.precision)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=2,
                              drop_path_rate=0.5)
    engine.build_optimizer(param_groups(model, 0.05), lr=1e-2, betas=(0.9, 0.999))
    gens = {"views": torch.Generator()}
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        step = state["step"]
    engine.start(state, gens)
    log = engine.open_log(state, step)
    net = engine.wrap(model)
    net.train()
    while step < TOTAL:
        apply_schedule(engine.optimizer, warmup_cosine(step, TOTAL, 2, 1e-2, 1e-4))
        x = torch.rand(4, 3, 16, 16, generator=gens["views"])
        with engine.autocast():
            loss = net(x).pow(2).mean()
        engine.backward(loss)
        norm = engine.step(model.parameters(), clip=1.0)
        step += 1
        log.write({"kind": "train", "step": step, "loss": loss.item(), "grad_norm": norm})
        if step % 2 == 0:
            engine.save({"config": {"lr": 1e-2}, "model": model.state_dict(), "step": step}, gens)
        if step == stop_at:
            return None
    return model.state_dict()


def test_a_resumed_loop_ends_with_the_uninterrupted_weights(tmp_path):
    full = run(tmp_path / "full")
    assert run(tmp_path / "cut", stop_at=3) is None          # killed after step 3; last.pt is step 2
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(tmp_path / "cut")                                # the rule: no silent continue or overwrite
    resumed = run(tmp_path / "cut", resume=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert {"optimizer", "scaler", "rng", "rng_ranks", "model", "step"} <= set(saved)
    assert len(saved["rng_ranks"]) == 1 and "views" in saved["rng"]["generators"]


@pytest.mark.parametrize("started,moved", [("1", "0"), ("0", "1")], ids=["bf16-run-on-fp32-cpu", "fp32-run-on-bf16-cpu"])
def test_auto_precision_resolves_once_per_run_not_per_resume(tmp_path, monkeypatch, started, moved):
    """A run started where `auto` means bf16 and resumed on a CPU without native bf16 (or the other way
    round) keeps its first precision, so it ends with the weights of the uninterrupted run."""
    monkeypatch.setenv("CXRVIT_FORCE_BF16", started)
    full = run(tmp_path / "full", precision="auto")
    assert run(tmp_path / "cut", stop_at=3, precision="auto") is None
    monkeypatch.setenv("CXRVIT_FORCE_BF16", moved)           # the run moves to the other kind of machine
    seen = []
    resumed = run(tmp_path / "cut", resume=True, precision="auto", seen=seen)
    assert seen == ["bf16" if started == "1" else "fp32"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["precision"] == seen[0]


def test_precision_resolves_once_for_autocast_scaler_and_records(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRVIT_FORCE_BF16", "1")
    bf16 = Engine(tmp_path, DistContext(), "auto", seed=0)
    assert bf16.amp == torch.bfloat16 and bf16.precision == "bf16" and not bf16.scaler.is_enabled()
    with bf16.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    fp32 = Engine(tmp_path, DistContext(), "fp32", seed=0)
    assert fp32.amp is None and fp32.precision == "fp32"
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Engine(tmp_path, DistContext(), "fp16", seed=0)


def test_step_clips_and_reports_the_norm_only_when_asked(tmp_path):
    engine = Engine(tmp_path, DistContext(), "fp32", seed=0)
    layer = nn.Linear(2, 1, bias=False)
    engine.build_optimizer([{"params": list(layer.parameters())}], lr=0.0, betas=(0.9, 0.999))
    for clip, measure, expect in ((0.0, False, None), (0.0, True, 10.0), (1.0, False, 10.0)):
        layer.weight.grad = torch.tensor([[6.0, 8.0]])
        assert engine.step(layer.parameters(), clip, measure) == expect
        assert layer.weight.grad is None                      # cleared for the next step
    layer.weight.grad = torch.tensor([[6.0, 8.0]])
    engine.scaler.unscale_ = lambda opt: None                 # keep the clipped gradient to look at
    engine.optimizer.zero_grad = lambda set_to_none=True: None
    engine.step(layer.parameters(), clip=1.0)
    assert math.isclose(layer.weight.grad.norm().item(), 1.0, rel_tol=1e-5)


def dino_clip_gradients(params, clip):
    """DINO's utils.clip_gradients, verbatim but for the return value."""
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def test_per_param_clipping_is_dinos_clip_gradients():
    torch.manual_seed(0)
    grads = [torch.randn(4, 5) * s for s in (0.5, 1.0, 2.9, 3.1, 10.0, 50.0)]
    ours, ref = ([nn.Parameter(torch.zeros(4, 5)) for _ in grads] for _ in range(2))
    for a, b, g in zip(ours, ref, grads):
        a.grad, b.grad = g.clone(), g.clone()
    ours.append(nn.Parameter(torch.zeros(3)))                  # no gradient: skipped, as in DINO
    total = clip_grad_per_param_(ours, 3.0)
    dino_clip_gradients(ref, 3.0)
    assert math.isclose(float(total), float(torch.stack([g.norm() for g in grads]).norm()), rel_tol=1e-5)
    for a, b, g in zip(ours, ref, grads):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
        if g.norm() < 3.0:
            assert torch.equal(a.grad, g)                     # under the bound: untouched, bit for bit
        else:
            assert math.isclose(a.grad.norm().item(), 3.0, rel_tol=1e-5)


def test_step_clips_per_parameter_when_asked(tmp_path):
    """Two gradients of norm 2 and 0.5, clip 1: global clipping scales both by 1/2.06; per parameter only
    the first is clipped (to 1) and the second is left alone."""
    engine = Engine(tmp_path, DistContext(), "fp32", seed=0)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    engine.build_optimizer([{"params": [a, b]}], lr=0.0, betas=(0.9, 0.999))
    engine.optimizer.zero_grad = lambda set_to_none=True: None
    for mode, expect_a, expect_b in (("global", 2 / math.hypot(2, 0.5), 0.5 / math.hypot(2, 0.5)),
                                     ("per_param", 1.0, 0.5)):
        a.grad, b.grad = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.5])
        norm = engine.step([a, b], clip=1.0, clip_mode=mode)
        assert math.isclose(norm, math.hypot(2, 0.5), rel_tol=1e-6)   # the log's norm: global, before clipping
        assert math.isclose(a.grad.norm().item(), expect_a, rel_tol=1e-5)
        assert math.isclose(b.grad.norm().item(), expect_b, rel_tol=1e-5)
    with pytest.raises(ValueError, match="clip_mode"):
        engine.step([a, b], clip=1.0, clip_mode="per-layer")


def test_one_process_needs_no_ddp():
    ctx = setup("cpu")
    assert ctx.world_size == 1 and ctx.is_main and not ctx.distributed and ctx.device.type == "cpu"
    layer = nn.Linear(2, 1)
    assert wrap_ddp(layer, ctx) is layer
