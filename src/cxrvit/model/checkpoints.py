"""Load ViT weights from other projects' checkpoints into cxrvit's (DINO's) key layout.

Usage::

    from cxrvit.model.checkpoints import load_backbone

    # into a model (any num_classes): the head is left as initialised unless head=True
    model, report = load_backbone("dino_deitsmall16_pretrain_full_checkpoint.pth", vit_small(num_classes=15))
    print(report.summary())        # layout found, what was dropped, missing/unexpected keys, notes

    # only convert: a DINO-layout state_dict (CPU tensors), no model needed
    state, report = load_backbone("mae_pretrain.pth")

    # strict: every backbone key must be found and nothing may be left over
    model, report = load_backbone("RUN/", vit_small(), strict=True)

``load_init_backbone(path, model)`` is what a training run's ``--init`` uses: the same load, but a file of which
no backbone tensor fits the model is an error, and a partial load prints its report.

``load_backbone(path, model=None, *, strict=False, head=False, prefer="teacher")`` returns
``(model, report)`` when a model is given (weights loaded in place) and ``(state_dict, report)``
otherwise. The layout is detected from the file's contents, never its name:

====================  ===========================================================================
layout                what is done
====================  ===========================================================================
``dino``              bare DINO backbone (150 keys), loaded as is
``dino-train``        DINO training checkpoint: ``teacher`` (or ``student``) with ``module.`` /
                      ``backbone.`` prefixes stripped; the DINOHead (``head.mlp``, ``head.last_layer``)
                      dropped
``mae``               MAE checkpoint (``model``): ``decoder_*`` and ``mask_token`` dropped; an MAE
                      fine-tune's ``fc_norm`` becomes ``norm`` (with a note: MAE fine-tunes pool by mean
                      over patch tokens, cxrvit reads the CLS token)
``ijepa``             I-JEPA (``target_encoder``, else ``encoder``): no CLS token and a 196-token
                      ``pos_embed``; the CLS position is padded with zeros and ``cls_token`` initialised
                      (trunc-normal 0.02, seeded), both noted
``timm``              timm ``vit_small_patch16_224``: the 1000-class ImageNet head dropped
``cxrvit``            a cxrvit bundle folder (``model.safetensors``) or cxrvit safetensors / training
                      checkpoint
====================  ===========================================================================

Prefixes are stripped only at the start of a key. A position table trained at another resolution
is resampled bicubically to the model's grid (noted). Any other shape mismatch raises
:class:`CheckpointError` naming the key and both shapes.

Safety: pickled files are read with ``torch.load(weights_only=True)``. DINO and MAE training
checkpoints pickle their ``argparse.Namespace`` of arguments, so exactly that one class is allowed
(``torch.serialization.safe_globals``); any other pickled class is refused with an error naming it.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cxrvit.fileio import atomic_write
from cxrvit.model.vit import VisionTransformer, dino_resample_pos_embed

#: Classes a checkpoint may pickle besides tensors and plain containers (DINO / MAE ``args``).
SAFE_GLOBALS = [argparse.Namespace]
#: Wrappers stripped from the start of keys (DDP, DINO's MultiCropWrapper, torch.compile).
KEY_PREFIXES = ("module.", "_orig_mod.", "backbone.")
HEAD_KEYS = ("head.weight", "head.bias")
#: The layouts :func:`to_dino_layout` recognises (the module docstring's table).
LAYOUTS = ("dino", "dino-train", "mae", "ijepa", "timm", "cxrvit")


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as a safetensors file at ``path`` (atomic), byte for byte the same for the same tensors and
    metadata, so that a file's sha256 (what ``bench arms`` pins for an init file, what provenance notes quote) names
    its content. Why the extra step: safetensors writes its JSON header's keys in a per-process order (a Rust hash
    map), so two exports of one model differed in their first bytes. The header is rewritten with sorted keys in
    the same number of bytes (its padding kept), which leaves every tensor's offsets as they were."""
    def write(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=metadata)
        with open(tmp, "r+b") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) <= n:   # the same keys and values, compact: never longer than what safetensors wrote
                fh.seek(8)
                fh.write(text + b" " * (n - len(text)))
    return atomic_write(path, write)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclass
class LoadReport:
    path: str
    layout: str
    source: str = ""                                        # e.g. "teacher", "model", "target_encoder"
    dropped: list[str] = field(default_factory=list)        # keys deliberately discarded
    missing: list[str] = field(default_factory=list)        # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)     # checkpoint keys the model lacks
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.path}: layout {self.layout}" + (f" (from '{self.source}')" if self.source else "")]
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} keys: {_abbrev(self.dropped)}")
        if self.missing:
            lines.append(f"  missing {len(self.missing)} keys: {_abbrev(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected {len(self.unexpected)} keys: {_abbrev(self.unexpected)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _abbrev(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# -- reading files ---------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Read a file (or cxrvit bundle folder) safely -> (object, safetensors metadata or {})."""
    path = Path(path)
    if path.is_dir():
        # A training run (model bundle) holds model.safetensors; a pre-training run, backbone.safetensors.
        found = [path / n for n in ("model.safetensors", "backbone.safetensors") if (path / n).is_file()]
        if not found:
            raise CheckpointError(f"{path}: a folder, but neither a cxrvit model bundle (model.safetensors) "
                                  "nor a pre-training run (backbone.safetensors)")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(64)  # safetensors: 8-byte header length, then the JSON header's "{"
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except Exception as e:  # not safetensors after all: fall through to torch.load
            if path.suffix == ".safetensors":
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        # torch.save writes a zip archive (a raw pickle, protocol 2+, before torch 1.6); anything else -- a saved
        # error page, a git-LFS pointer, an empty file -- would reach the unpickler and read as a security refusal.
        raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint ({_what_it_is(head)})")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the class {found.group(1)}" if found else "an object that is not a tensor or plain container"
        raise CheckpointError(
            f"{path}: refused to load: it pickles {what}. cxrvit loads with weights_only=True and allows "
            f"only tensors, plain containers and argparse.Namespace (DINO/MAE 'args')") from e
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj, {}


def _what_it_is(head: bytes) -> str:
    """A guess at a foreign file from its first bytes, for the error message."""
    text = head.lstrip().lower()
    if not head:
        return "the file is empty"
    if text.startswith(b"version https://git-lfs"):
        return "it is a git-LFS pointer: fetch the real file with `git lfs pull`"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "it is an HTML/XML page, e.g. a download that saved an error or login page"
    return f"it starts with {head[:16]!r}"


def strip_prefixes(state: dict, prefixes=KEY_PREFIXES) -> dict:
    """Remove wrapper prefixes, only at the start of each key (``blocks.0.module.x`` is untouched)."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _tensors(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}


# -- layout conversion -----------------------------------------------------------------------------
def to_dino_layout(obj: dict, *, prefer: str = "teacher", path: str = "<checkpoint>",
                   meta: dict | None = None, embed_dim: int | None = None) -> tuple[dict, LoadReport]:
    """Convert a checkpoint object (as read) into a DINO-layout state_dict and say what was done."""
    meta = meta or {}
    report = LoadReport(path=str(path), layout="")
    # 1. find the weights inside any wrapper
    if "teacher" in obj or "student" in obj:
        other = "student" if prefer == "teacher" else "teacher"
        report.source = prefer if prefer in obj else other
        report.layout = "dino-train"
        state = strip_prefixes(_tensors(obj[report.source]))
        dino_head = [k for k in state if k.startswith("head.")]
        report.dropped += dino_head
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        if dino_head:
            report.notes.append("DINOHead projection (head.mlp / head.last_layer) dropped")
    elif "target_encoder" in obj or "encoder" in obj:
        report.source = "target_encoder" if "target_encoder" in obj else "encoder"
        report.layout = "ijepa"
        state = strip_prefixes(_tensors(obj[report.source]))
    else:
        inner_key = next((k for k in ("model", "state_dict_ema", "model_ema", "state_dict") if k in obj
                          and isinstance(obj[k], dict)), None)
        report.source = inner_key or ""
        state = strip_prefixes(_tensors(obj[inner_key] if inner_key else obj))
        if not state:
            raise CheckpointError(f"{path}: found no tensors (top-level keys: {_abbrev(list(obj))})")
        is_cxrvit = meta.get("layout") == "dino" or str(obj.get("format", "")).startswith("cxrvit")
        is_mae = any(k.startswith("decoder_") for k in state) or "mask_token" in state or "fc_norm.weight" in state
        if is_cxrvit:
            report.layout = "cxrvit"
        elif is_mae:
            report.layout = "mae"
        elif "head.weight" in state and state["head.weight"].shape[0] == 1000:
            report.layout = "timm"
        else:
            report.layout = "dino"

    # 2. per-layout fixes
    if report.layout == "mae":
        decoder = [k for k in state if k.startswith("decoder_") or k == "mask_token"]
        report.dropped += decoder
        state = {k: v for k, v in state.items() if k not in set(decoder)}
        if "fc_norm.weight" in state:
            for part in ("weight", "bias"):
                state[f"norm.{part}"] = state.pop(f"fc_norm.{part}")
            report.notes.append("fc_norm mapped onto norm: the model was fine-tuned to pool by the mean of its patch "
                                "tokens (an MAE fine-tune, or a timm ViT with global_pool='avg'), so read it the same "
                                "way (model.global_pool=avg); its head never saw the CLS token")
    if report.layout == "timm" and "head.weight" in state and state["head.weight"].shape[0] == 1000:
        report.dropped += [k for k in HEAD_KEYS if k in state]
        state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
        report.notes.append("timm 1000-class ImageNet head dropped")
    if "cls_token" not in state and "pos_embed" in state:
        pos = state["pos_embed"]
        dim = pos.shape[-1]
        n = pos.shape[1]
        if int(n ** 0.5) ** 2 == n:  # no CLS slot: pad one (zeros), and initialise the CLS token
            state["pos_embed"] = torch.cat((pos.new_zeros(1, 1, dim), pos), dim=1)
            gen = torch.Generator().manual_seed(0)
            cls = torch.empty(1, 1, dim)
            torch.nn.init.trunc_normal_(cls, std=0.02, generator=gen)
            state["cls_token"] = cls.to(pos.dtype)
            report.notes.append(f"no CLS token in checkpoint: pos_embed padded with a zero CLS position "
                                f"({n} -> {n + 1} tokens) and cls_token initialised trunc-normal(0.02, seed 0)")
    if embed_dim is not None and "cls_token" in state and state["cls_token"].shape[-1] != embed_dim:
        raise CheckpointError(f"{path}: width mismatch: cls_token has width {state['cls_token'].shape[-1]}, "
                              f"the model {embed_dim} (a different ViT size?)")
    return state, report


# -- loading into a model --------------------------------------------------------------------------
def load_backbone(path: str | Path, model: VisionTransformer | None = None, *, strict: bool = False,
                  head: bool = False, prefer: str = "teacher"):
    """Load weights from ``path`` (any supported layout). See the module docstring.

    ``head=False`` (the default) ignores head keys in the file and leaves the model's head as
    initialised: what fine-tuning from a pre-trained backbone wants, for any ``num_classes``.
    ``head=True`` loads them too (they must match the model's head shape).
    ``strict=True`` raises if any model key (head excluded unless ``head=True``) is missing or any
    checkpoint key is unexpected; keys dropped on purpose (DINOHead, MAE decoder) do not count.
    """
    obj, meta = read_checkpoint(path)
    embed_dim = model.embed_dim if model is not None else None
    state, report = to_dino_layout(obj, prefer=prefer, path=str(path), meta=meta, embed_dim=embed_dim)
    if not head:
        ignored = [k for k in HEAD_KEYS if k in state]
        if ignored:
            report.notes.append(f"head keys not loaded (head=False): {', '.join(ignored)}")
        state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    if model is None:
        return state, report

    target = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        src, dst = state["pos_embed"], target["pos_embed"]
        if src.shape[-1] == dst.shape[-1]:
            side = int((dst.shape[1] - 1) ** 0.5)
            try:   # DINO's rule, as the model resamples at run time: a 224-px checkpoint loaded into a 128-px
                   # model is the same function as the 224-px model run on 128-px inputs
                state["pos_embed"] = dino_resample_pos_embed(src, side, side)
            except ValueError as e:
                raise CheckpointError(f"{path}: pos_embed {tuple(src.shape)}: {e}") from e
            report.notes.append(f"pos_embed resampled (bicubic, DINO's rule) from {src.shape[1] - 1} to "
                                f"{dst.shape[1] - 1} patch positions")
    for k, v in state.items():
        if k in target and v.shape != target[k].shape:
            raise CheckpointError(f"{path}: shape mismatch for '{k}': checkpoint {tuple(v.shape)}, "
                                  f"model {tuple(target[k].shape)}")
    wanted = [k for k in target if head or k not in HEAD_KEYS]
    report.missing = [k for k in wanted if k not in state]
    report.unexpected = [k for k in state if k not in target]
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{path} (layout {report.layout}): strict load failed; missing "
                              f"{report.missing or 'none'}; unexpected {report.unexpected or 'none'}")
    usable = {k: v.to(target[k].dtype) for k, v in state.items() if k in target}
    model.load_state_dict(usable, strict=False)
    return model, report


def load_init_backbone(path: str | Path, model: VisionTransformer, *, quiet: bool = False) -> LoadReport:
    """:func:`load_backbone` for the weights a training run starts from (``--init``, a recipe's ``model.init``).

    A file of which no backbone tensor lands in ``model`` is refused, naming the key prefixes it holds and the
    layouts accepted: loaded leniently, it would leave the model at its random init while the run says it
    started from the file (e.g. a pre-training method's own ``state_dict``, ``encoder.*`` / ``decoder.*``).
    A partial load goes on, with the report on stderr (unless ``quiet``: DDP ranks other than 0)."""
    _, report = load_backbone(path, model)
    backbone = [k for k in model.state_dict() if k not in HEAD_KEYS]
    if all(k in report.missing for k in backbone):
        found = Counter(k.split(".")[0] for k in report.unexpected + report.dropped)
        held = ", ".join(f"{p}.* ({n})" for p, n in found.most_common(6)) or "no tensors besides the head"
        raise CheckpointError(
            f"{path}: none of its tensors is a backbone weight of this {type(model).__name__} (read as layout "
            f"{report.layout}; its keys: {held}). A start must be a ViT backbone in one of the layouts "
            f"{', '.join(LAYOUTS)}: e.g. a pre-training run's folder or backbone.safetensors, a model bundle, or a "
            f"DINO / MAE / I-JEPA / timm checkpoint")
    if report.missing and not quiet:
        print(f"[init] loaded only part of the backbone; the rest keeps its initialisation:\n{report.summary()}",
              file=sys.stderr, flush=True)
    return report


def read_export_metadata(path: str | Path) -> dict:
    """The cxrvit JSON metadata stored in an exported safetensors file ({} if none)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["cxrvit"]) if "cxrvit" in meta else {}
