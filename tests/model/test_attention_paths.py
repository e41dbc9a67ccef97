"""The two attention paths (fused SDPA, explicit softmax) compute the same function; ``auto`` picks per device/dtype."""
from __future__ import annotations

import pytest
import torch

from cxrvit.model.vit import Attention, set_attention, vit_small
from cxrvit.runtime import attention_path

# bf16 has an 8-bit significand (unit roundoff 2^-9); twelve blocks of matmuls, softmax and LayerNorm
# in bf16 measured 4-8e-3 max |logit error| on ViT-S at 64 px (logits ~0.85). The documented bound for
# either path under bf16 autocast is 2^-5 of the largest fp32 logit (docs/model.md).
BF16_BOUND = 2.0 ** -5


def test_auto_picks_explicit_only_for_cpu_low_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_path(cpu, torch.float32) == "sdpa"
    assert attention_path(cpu, torch.bfloat16) == "explicit"
    assert attention_path(cpu, torch.float16) == "explicit"
    assert attention_path(cuda, torch.bfloat16) == "sdpa"
    assert attention_path(cuda, torch.float32) == "sdpa"


def test_setting_never_changes_the_state_dict():
    torch.manual_seed(0)
    a = vit_small(num_classes=3)
    torch.manual_seed(0)
    b = vit_small(num_classes=3, attention="explicit")
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(m.attention == "explicit" for m in b.modules() if isinstance(m, Attention))
    with pytest.raises(ValueError, match="attention"):
        set_attention(a, "flash")


def _run(model, x, path, bf16):
    set_attention(model, path)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x).float()
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fp32_paths_equal_within_1e5_forward_and_backward():
    torch.manual_seed(0)
    model = vit_small(num_classes=3).train()  # train mode: the backward is what differs between kernels
    x = torch.randn(2, 3, 64, 64)
    out_s, grad_s = _run(model, x, "sdpa", bf16=False)
    out_e, grad_e = _run(model, x, "explicit", bf16=False)
    assert (out_s - out_e).abs().max() < 1e-5
    for name in grad_s:
        scale = grad_s[name].abs().max().clamp_min(1.0)
        assert (grad_s[name] - grad_e[name]).abs().max() / scale < 1e-5, name


def test_bf16_paths_within_documented_bound_of_fp32():
    torch.manual_seed(0)
    model = vit_small(num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        set_attention(model, "sdpa")
        ref = model(x)
        scale = ref.abs().max()
        for path in ("sdpa", "explicit", "auto"):
            set_attention(model, path)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x).float()
            assert (out - ref).abs().max() <= BF16_BOUND * scale, path


def test_auto_under_bf16_autocast_is_the_explicit_kernel():
    torch.manual_seed(0)
    model = vit_small(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = set_attention(model, "auto")(x)
        explicit = set_attention(model, "explicit")(x)
    assert torch.equal(auto, explicit)
