"""The parsing rules training and pre-training configs share: nested dict -> typed dataclass, ``--set`` overrides.

Every key must be known and every value has the field's type, so a typo or a wrong type in a recipe or
in ``--set`` is an error that names the file and the key. Validation rows (:func:`check_all`) raise the
first failing ``(key, ok, why)`` with the value. :mod:`cxrvit.training.config` and
:mod:`cxrvit.ssl.config` hold only their dataclasses and recipes.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key written twice in one mapping is an error: YAML readers keep the last one, which
    drops a whole recipe section (or an arms list) without a word. Keys brought in by a ``<<`` merge may be
    restated (that is what a merge is for), so only the keys written in the mapping itself are compared."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, typing.Hashable):
                    continue  # SafeLoader's own construct_mapping reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"{key!r} appears twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """A config file's YAML (safe types only; a key given twice in one mapping raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def build_dataclass(cls, d: dict, prefix: str, source: str):
    """Build dataclass ``cls`` from a nested dict, type-checking values; unknown keys name ``source``."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: section {prefix.rstrip('.') or '<root>'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ValueError(f"{source}: unknown config key {prefix + key!r}; "
                             f"known keys here: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value or {}, prefix + key + ".", source)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, source)
    return cls(**kwargs)


def build_config(cls, d: dict, source: str):
    """:func:`build_dataclass` of a whole config, then its own ``validate()``: a value its checks refuse names
    ``source`` (the recipe file, a saved ``config.yaml`` or checkpoint) as a wrong key or type already does."""
    cfg = build_dataclass(cls, d, prefix="", source=source)
    try:
        return cfg.validate()
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _coerce(value: Any, hint, key: str, source: str):
    """Check/convert a YAML value to the field's type (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, key, source) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{source}: {key} must be {hint.__name__}, got {value!r}")


def optimizer_checks(o) -> list[tuple[str, bool, str]]:
    """The check rows of an ``optim`` section, which training and pre-training configs share (AdamW's lr, min_lr,
    betas, warm-up and clipping). lr 0 is allowed: it keeps the weights where they start (an lp_ft run then ends
    as its probe)."""
    return [
        ("optim.lr", math.isfinite(o.lr) and o.lr >= 0, "must be a finite number >= 0"),
        ("optim.min_lr", math.isfinite(o.min_lr) and o.min_lr >= 0, "must be a finite number >= 0"),
        ("optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "must be [beta1, beta2], each in [0, 1)"),
        ("optim.warmup_epochs", o.warmup_epochs >= 0, "must be >= 0"),
        ("optim.clip_grad", o.clip_grad >= 0, "must be >= 0 (0 = off)"),
    ]


def check_all(cfg, checks: list[tuple[str, bool, str]], what: str) -> None:
    """The validation shape training and pre-training configs share: ``(key, ok, why)`` rows, the first
    failing one raised as ``ValueError("<what> <key>=<value>: <why>")`` (the value when ``key`` names a field)."""
    for key, ok, why in checks:
        if not ok:
            try:
                shown = f"{key}={get_dotted(cfg, key)!r}"
            except AttributeError:  # a check over several fields, named in words
                shown = key
            raise ValueError(f"{what} {shown}: {why}")


def get_dotted(cfg, dotted: str):
    """``cfg.a.b`` for ``"a.b"`` on a (nested) config dataclass."""
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML: ``3e-4``, ``true``, ``[0.6, 1]``)."""
    d = copy_nested(d)
    for item in overrides or []:
        dotted, value = parse_override(item)
        parts = dotted.split(".")
        node = d
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return d


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads "3e-4" as a string
    return dotted.strip(), value


def dotted_keys(d: dict, prefix: str = "") -> list[str]:
    """Every key of a nested dict as ``section.key`` (sections themselves included)."""
    keys = []
    for key, value in d.items():
        keys.append(prefix + str(key))
        if isinstance(value, dict):
            keys += dotted_keys(value, prefix + str(key) + ".")
    return keys


def merge(below: dict, above: dict) -> dict:
    """``above`` over ``below``, section by section (a recipe over its base)."""
    out = copy_nested(below)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy_nested(value)
    return out


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def copy_nested(d):
    if isinstance(d, dict):
        return {k: copy_nested(v) for k, v in d.items()}
    if isinstance(d, list):
        return [copy_nested(v) for v in d]
    return d
