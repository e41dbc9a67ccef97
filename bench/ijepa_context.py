"""Export the *context* encoder of an I-JEPA pre-training run as a backbone file, for a diagnostic read-out.

`cxrvit pretrain --method ijepa` exports the EMA *target* encoder, as I-JEPA evaluates it. Over a short run
(issue 20's arm: ~800 steps, momentum 0.996 rising towards 1) the target still holds about 15 % of its random
initialisation (the product of the momenta), so a weak target read-out cannot tell "I-JEPA learned little" from
"the average has not caught up yet". The context encoder, the network the gradients train, answers that: this
script writes it from the run's ``last.pt`` in the same DINO layout (``cxrvit train --init FILE`` reads it), with
metadata naming the run, its step and the file's sha256.

    python bench/ijepa_context.py RUN/last.pt OUT.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from cxrvit.engine.checkpoint import load_checkpoint
from cxrvit.ssl.encoder import build_encoder, export_backbone

PREFIX = "context_encoder."


def export_context_encoder(last_pt: str | Path, out: str | Path) -> Path:
    """Write the context encoder held in an I-JEPA ``last.pt`` to ``out`` (safetensors, DINO layout)."""
    ck = load_checkpoint(last_pt)
    method = (ck.get("config") or {}).get("method")
    if method != "ijepa":
        raise ValueError(f"{last_pt}: a {method!r} pre-training checkpoint; only I-JEPA's has a context encoder")
    model = ck["config"]["model"]
    vit = build_encoder(model["arch"], depth=model["depth"], patch_size=model["patch_size"])
    state = {k[len(PREFIX):]: v for k, v in ck["method"].items() if k.startswith(PREFIX)}
    result = vit.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{last_pt}: context encoder does not match {model['arch']} "
                         f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    digest = hashlib.sha256(Path(last_pt).read_bytes()).hexdigest()
    return export_backbone(vit, out, arch=model["arch"], method="ijepa-context",
                           cls_token="learnt through attention only (I-JEPA has no CLS objective)",
                           extra={"source": str(last_pt), "source_sha256": digest, "step": ck["step"]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("last_pt", help="an I-JEPA run's last.pt")
    ap.add_argument("out", help="the backbone file to write (.safetensors)")
    args = ap.parse_args(argv)
    try:
        path = export_context_encoder(args.last_pt, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
