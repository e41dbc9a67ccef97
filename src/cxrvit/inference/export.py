"""``cxrvit export``: a trained bundle as a plain DINO state_dict, a safetensors file, or ONNX.

Every export keeps only the head rows of the chosen labels (in the order asked for) and writes the
information needed to use the weights without cxrvit: labels, tuned thresholds and preprocessing.

- ``dino``: ``torch.save`` of a plain ``{name: tensor}`` dict in DINO's layout (150 backbone keys +
  ``head.weight [K, 384]`` + ``head.bias [K]``), loadable with ``strict=True`` by DINO's own
  ``vit_small(num_classes=K)`` and readable with ``torch.load(weights_only=True)``; the metadata sits
  beside it as ``<out>.json``, the whole name plus ``.json`` (``model.pth.json``), so a ``.pth`` and an
  ``.onnx`` export of the same stem keep their own metadata (:func:`metadata_path`).
- ``safetensors``: the same tensors, with the metadata JSON stored in the file header (key
  ``cxrvit``; read it with :func:`cxrvit.model.checkpoints.read_export_metadata`).
- ``onnx``: a graph from one-channel grey in [0, 1] (``grey [B, 1, H, W]``) to ``logits`` and
  ``probabilities`` (``[B, K]``), dynamic batch. The ImageNet normalisation is folded exactly into a
  one-channel patch filter (:func:`~cxrvit.model.vit.fold_patch_embed_to_grey`), so the graph needs
  no preprocessing beyond resizing and dividing by 255. The size is fixed (the bundle's) unless
  ``dynamic_size`` is set, in which case any H, W that are multiples of 16 work and the position
  table is resampled inside the graph. Each ONNX export is checked against PyTorch with
  onnxruntime and the largest absolute logit difference is recorded in the metadata.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cxrvit.data.preprocess import Preprocessing
from cxrvit.fileio import atomic_write
from cxrvit.inference.bundle import Bundle, load_bundle
from cxrvit.model.checkpoints import save_weights
from cxrvit.model.vit import VisionTransformer, dino_resample_pos_embed, fold_patch_embed_to_grey

FORMATS = ("dino", "safetensors", "onnx")
EXPORT_FORMAT = "cxrvit-export/1"


@dataclass
class ExportResult:
    weights: Path
    metadata: dict
    metadata_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def select_labels(model: VisionTransformer, labels: list[str], chosen: list[str] | None) -> tuple[dict, list[str]]:
    """The model's state_dict with the head cut down to ``chosen`` labels (rows in that order)."""
    chosen = list(labels) if not chosen else list(chosen)
    unknown = [c for c in chosen if c not in labels]
    if unknown:
        raise ValueError(f"labels not in the model's head: {', '.join(unknown)}; the model has: {', '.join(labels)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"--labels has duplicates: {', '.join(chosen)}")
    rows = torch.tensor([labels.index(c) for c in chosen])
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    if "head.weight" not in state:
        raise ValueError("the model has no classification head to export labels from")
    state["head.weight"] = state["head.weight"][rows].contiguous()
    state["head.bias"] = state["head.bias"][rows].contiguous()
    return state, chosen


def export_metadata(bundle: Bundle, chosen: list[str], fmt: str) -> dict:
    pre = bundle.preprocessing
    return {
        "format": EXPORT_FORMAT,
        "export_format": fmt,
        "arch": bundle.arch,
        "layout": "dino",
        "labels": chosen,
        "thresholds": {c: float(bundle.thresholds[c]) for c in chosen if c in bundle.thresholds},
        # what the head reads; no weight says it (a DINO-layout loader defaults to the last block's CLS token)
        "read_out": {"global_pool": bundle.model.global_pool, "n_last_blocks": bundle.model.n_last_blocks},
        "preprocessing": {
            "input_size": [pre.size, pre.size],
            "mean": list(pre.mean),
            "std": list(pre.std),
            "channels": pre.channels,
            "geometry": pre.geometry,
            "scale": "grey uint8 / 255, repeated to 3 channels, then (x - mean) / std per channel",
        },
        "output": "logits of independent sigmoids, one per label; positive where sigmoid(logit) >= threshold",
    }


def export_bundle(run: str | os.PathLike, out: str | os.PathLike, fmt: str = "dino",
                  labels: list[str] | None = None, *, dynamic_size: bool = False,
                  opset: int = 18) -> ExportResult:
    """Export the bundle at ``run`` to ``out`` in ``fmt`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    meta_path = metadata_path(out)   # a bad --out is refused before any work (safetensors: header, no side file)
    bundle = load_bundle(run)
    state, chosen = select_labels(bundle.model, bundle.labels, labels)
    meta = export_metadata(bundle, chosen, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dino":
        atomic_write(out, lambda tmp: torch.save(state, tmp))
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        return ExportResult(out, meta, meta_path)
    if fmt == "safetensors":
        header = {"format": "pt", "layout": "dino", "cxrvit": json.dumps(meta)}
        save_weights(state, out, header)
        return ExportResult(out, meta)
    # onnx: a copy of the model holding exactly the exported head
    model = copy.deepcopy(bundle.model).float().cpu()
    model.head = nn.Linear(model.num_features, len(chosen))
    model.load_state_dict(state, strict=True)
    size = bundle.preprocessing.size
    export_onnx(model, out, bundle.preprocessing, size=size, dynamic_size=dynamic_size, opset=opset)
    sizes = [(size, size)] + ([(size + 32, size - 16 if size > 32 else size + 16)] if dynamic_size else [])
    diff = verify_onnx(out, model, bundle.preprocessing, sizes=sizes)
    meta["onnx"] = {"input": "grey", "input_layout": "[B, 1, H, W] float32, grey / 255 (0..1)",
                    "outputs": ["logits", "probabilities"], "dynamic_batch": True,
                    "dynamic_size": "multiples of 16" if dynamic_size else False,
                    "opset": opset, "max_abs_diff_vs_torch": diff, "checked_sizes": [list(s) for s in sizes]}
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return ExportResult(out, meta, meta_path, [f"onnxruntime vs PyTorch: max |logit diff| = {diff:.2e}"])


def metadata_path(out: str | os.PathLike) -> Path:
    """The metadata file beside a dino or onnx export: ``out``'s whole name plus ``.json``.

    Not ``with_suffix(".json")``: ``model.pth`` and ``model.onnx`` would share ``model.json``, and
    ``--out model.json`` would write the metadata over the weights.
    """
    out = Path(out)
    if not out.name or out.is_dir():   # "/" or an existing folder: no file to put the weights in
        raise ValueError(f"{out}: --out must name a file for the weights, not a folder")
    return out.with_name(out.name + ".json")   # longer than out's name, so never out itself


# -- ONNX ------------------------------------------------------------------------------------------
def _bicubic_matrix(out, side: int, dtype) -> torch.Tensor:
    """``[out, side]`` weights that resample ``side`` positions to ``out`` as DINO's bicubic call does: scale
    (out + 0.1) / side, half-pixel centres, A = -0.75, edge indices clamped (PyTorch's ``upsample_bicubic2d``);
    the identity when ``out == side``."""
    dst = torch.arange(out, dtype=torch.float32)
    n = dst[-1:] + 1                                     # ``out`` as a tensor: stays symbolic in an export
    # At the stored side DINO returns the table itself: scale 1 makes these weights the identity.
    real = (dst + 0.5) * side / (n + 0.1 * (n != side).to(torch.float32)) - 0.5
    i0 = torch.floor(real)
    t = (real - i0)[:, None] + torch.tensor([1.0, 0.0, -1.0, -2.0])           # distance to taps -1, 0, 1, 2
    a, d = -0.75, t.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    w = torch.where(d <= 1, near, far)                                       # [out, 4]
    taps = (i0[:, None] + torch.tensor([-1.0, 0.0, 1.0, 2.0])).clamp(0, side - 1)
    onehot = (taps[..., None] == torch.arange(side, dtype=torch.float32)).to(torch.float32)   # [out, 4, side]
    return (w[..., None] * onehot).sum(1).to(dtype)


def symbolic_dino_resample(pos_embed: torch.Tensor, gh, gw) -> torch.Tensor:
    """:func:`~cxrvit.model.vit.dino_resample_pos_embed` as two matrix products, so that an exported graph keeps
    the grid symbolic (``F.interpolate``'s scale factor would be traced as the example's constant). Equal to it
    within float32 rounding (tests/inference/test_export.py)."""
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    grid = pos_embed[0, 1:].reshape(side, side, -1)
    mh, mw = _bicubic_matrix(gh, side, grid.dtype), _bicubic_matrix(gw, side, grid.dtype)
    out = torch.einsum("hs,std,wt->hwd", mh, grid, mw)
    return torch.cat((pos_embed[:, :1], out.reshape(1, -1, out.shape[-1])), dim=1)


class GreyInputViT(nn.Module):
    """``grey [B, 1, H, W]`` in [0, 1] -> (logits, probabilities), normalisation folded into the patch filter.

    Folding is exact (see ``fold_patch_embed_to_grey``) and makes the patch embedding a third of the
    work. With a fixed size the resampled position table is a constant; with ``dynamic_size`` it is
    resampled in the graph by the same DINO rule as the torch model (``dino_resample_pos_embed``).
    """

    def __init__(self, model: VisionTransformer, pre: Preprocessing, size: int, dynamic_size: bool):
        super().__init__()
        self.vit = model
        w, b = fold_patch_embed_to_grey(model.patch_embed.proj.weight.detach(), model.patch_embed.proj.bias.detach(),
                                        pre.mean, pre.std)
        p = model.patch_size
        self.grey_proj = nn.Conv2d(1, model.embed_dim, kernel_size=p, stride=p)
        self.grey_proj.weight.data.copy_(w)
        self.grey_proj.bias.data.copy_(b)
        self.dynamic_size = dynamic_size
        with torch.no_grad():
            dummy = torch.zeros(1, 1 + (size // p) ** 2, model.embed_dim)
            self.register_buffer("pos_fixed", model.interpolate_pos_encoding(dummy, size, size).detach().clone())

    def _pos(self, gh: int, gw: int) -> torch.Tensor:
        if not self.dynamic_size:
            return self.pos_fixed
        return symbolic_dino_resample(self.vit.pos_embed, gh, gw)

    def forward(self, grey: torch.Tensor):
        b, _, h, w = grey.shape
        p = self.vit.patch_size
        x = self.grey_proj(grey).flatten(2).transpose(1, 2)
        x = torch.cat((self.vit.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self._pos(h // p, w // p)
        logits = self.vit.forward_head(self.vit.forward_blocks(x))
        return logits, torch.sigmoid(logits)


def export_onnx(model: VisionTransformer, out: str | os.PathLike, pre: Preprocessing, *, size: int,
                dynamic_size: bool = False, opset: int = 18) -> Path:
    """Write ``model`` as ONNX (grey input, dynamic batch; dynamic multiple-of-16 size if asked)."""
    if size % model.patch_size:
        raise ValueError(f"ONNX input size {size} is not a multiple of the patch size {model.patch_size}")
    wrapper = GreyInputViT(model.eval(), pre, size, dynamic_size).eval()
    example = torch.rand(2, 1, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {0: batch}
    if dynamic_size:
        # H = 16 * gh: expressing sizes as multiples of the patch keeps every reshape exact
        p = model.patch_size
        shapes[2] = p * torch.export.Dim("grid_h", min=1, max=256)
        shapes[3] = p * torch.export.Dim("grid_w", min=1, max=256)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["grey"],
                                    output_names=["logits", "probabilities"], dynamic_shapes={"grey": shapes},
                                    opset_version=opset, external_data=False, verbose=False)
    return atomic_write(out, lambda tmp: program.save(str(tmp), external_data=False))


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs a line per missing optional op set (torchvision) and deprecation
    warnings from its own internals; none of it concerns the exported graph."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def verify_onnx(path: str | os.PathLike, model: VisionTransformer, pre: Preprocessing,
                sizes: list[tuple[int, int]], batches: tuple[int, ...] = (1, 3), seed: int = 0) -> float:
    """Largest |logit| difference between onnxruntime and PyTorch eager (fp32) on random grey images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    model.eval()
    for h, w in sizes:
        for b in batches:
            grey = torch.rand(b, 1, h, w, generator=gen)
            with torch.no_grad():
                ref = model(pre.normalize(grey))
            got = torch.from_numpy(session.run(["logits"], {"grey": grey.numpy()})[0])
            worst = max(worst, (got - ref).abs().max().item())
    return worst
