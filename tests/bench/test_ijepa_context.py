"""bench/ijepa_context.py: the context encoder of an I-JEPA checkpoint, exported as a backbone file."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxrvit.data.preprocess import Preprocessing
from cxrvit.ssl.encoder import backbone_state, build_encoder
from cxrvit.ssl.ijepa import IJEPA, IJepaConfig

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ijepa_context", ROOT / "bench" / "ijepa_context.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _checkpoint(path: Path, method: str = "ijepa") -> IJEPA:
    torch.manual_seed(0)
    m = IJEPA(build_encoder("vit_tiny", depth=2), IJepaConfig(size=32, predictor_dim=32, predictor_depth=1,
                                                              predictor_heads=2), Preprocessing(size=32))
    with torch.no_grad():                      # a trained context encoder: no longer equal to its EMA target
        for p in m.context_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save({"config": {"method": method, "model": {"arch": "vit_tiny", "depth": 2, "patch_size": 16}},
                "method": m.state_dict(), "step": 7}, path)
    return m


def test_the_context_encoder_is_written_not_the_target(tmp_path):
    m = _checkpoint(tmp_path / "last.pt")
    out = script.export_context_encoder(tmp_path / "last.pt", tmp_path / "ctx.safetensors")
    saved = load_file(str(out))
    context, target = backbone_state(m.context_encoder), backbone_state(m.target_encoder)
    assert saved.keys() == context.keys() and len(saved) == 2 * 12 + 6   # 12 tensors a block, 6 outside
    assert all(torch.equal(saved[k], context[k]) for k in saved)
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], target["blocks.0.attn.qkv.weight"])
    with open(out, "rb") as fh:                 # safetensors metadata: where it came from
        head = fh.read(4096).decode("latin-1")
    assert '"method":"ijepa-context"' in head and '"step":"7"' in head


def test_another_methods_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    _checkpoint(tmp_path / "mae.pt", method="mae")
    with pytest.raises(ValueError, match=r"mae\.pt: a 'mae' pre-training checkpoint"):
        script.export_context_encoder(tmp_path / "mae.pt", tmp_path / "x.safetensors")
    assert script.main([str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")]) == 1
    assert "missing.pt" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
