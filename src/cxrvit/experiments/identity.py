"""What makes two runs of an arm "the same": its resolved config, what its strategy reads, defaults left out.

A finished fold is reused only while the arm's identity is unchanged. Identity is the *resolved*
config (recipe + overrides, as the engine will read it), not the text that produced it: a YAML
comment, a reordered key or an override that restates the recipe's value changes nothing. Fields
at their dataclass default are dropped, recursively, so a field added to the config later (as
``model.attention`` was) leaves every finished arm valid while it stays at its default; set to
anything else, it changes the identity like any other key. The price: changing a *default* is
invisible to identity, so a change of default behaviour needs a new OUT folder (docs/evaluation.md).

``legacy_config_hash`` reproduces the hash written into ``heldout.npz`` before identities existed
(every field, minus four later keys at their defaults), so predictions written then still load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from cxrvit.ssl.config import NOT_THE_BACKBONE, PretrainConfig
from cxrvit.training.config import REMOVED_KEYS, TrainConfig, config_to_dict, drop_unread, read_by_strategy


def strip_defaults(values: dict, defaults: dict) -> dict:
    """``values`` without the keys equal to ``defaults``; nested sections recurse and vanish when empty."""
    out = {}
    for key, value in values.items():
        if key not in defaults:
            out[key] = value
        elif isinstance(value, dict) and isinstance(defaults[key], dict):
            inner = strip_defaults(value, defaults[key])
            if inner:
                out[key] = inner
        elif value != defaults[key]:
            out[key] = value
    return out


def _plain(values) -> dict:
    """Plain JSON types: a tuple and a list of the same values are one identity."""
    return json.loads(json.dumps(dataclasses.asdict(values) if dataclasses.is_dataclass(values) else values))


#: Training settings that change how a run logs and checkpoints, never what it trains (resume is exact whatever the
#: checkpoint interval): changing them on a finished arm re-uses it instead of asking for a new OUT. No shipped plan
#: sets them for an arm, so every identity recorded before this rule is unchanged by it.
NOT_THE_RESULT = ("engine.log_every", "engine.checkpoint_every")


def _drop(config: dict, dotted_keys) -> dict:
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        here = config
        for part in parents:
            here = here.get(part) if isinstance(here, dict) else None
        if isinstance(here, dict):
            here.pop(leaf, None)
    return strip_defaults(config, {k: {} for k, v in config.items() if isinstance(v, dict)})


def config_identity(cfg) -> dict:
    """Any all-defaults config dataclass (TrainConfig, PretrainConfig) -> its non-default fields.

    For a training config only what its strategy reads counts (``training.config.read_by_strategy``),
    and not the recipe's ``name``: a probe recipe and a fine-tuning recipe that leave the probe the same
    settings train the same probe, whatever they are called."""
    if isinstance(cfg, TrainConfig):
        values = _plain(read_by_strategy(cfg))
        values.pop("name", None)
        return _drop(strip_defaults(values, _plain(type(cfg)())), NOT_THE_RESULT)
    if isinstance(cfg, PretrainConfig):
        return upgrade_pretrain_identity(strip_defaults(_plain(cfg), _plain(type(cfg)())))
    return strip_defaults(_plain(cfg), _plain(type(cfg)()))


def upgrade_pretrain_identity(config: dict) -> dict:
    """A pre-training config's identity less what does not change its backbone (``ssl.config.NOT_THE_BACKBONE``:
    name, device, logging, checkpoint interval, the monitor). Applied to an identity recorded before this rule,
    it gives today's, so an ``identity.yaml`` written then still matches its stages."""
    return _drop(json.loads(json.dumps(config)), NOT_THE_BACKBONE)


def upgrade_identity(saved: dict) -> dict:
    """A training config's identity as recorded under the every-field rule, read under today's: the recipe's
    ``name`` and what its strategy does not read are dropped (the rest was recorded without defaults
    already), so an ``identity.yaml`` written then still matches the arms it describes."""
    config = json.loads(json.dumps(saved))
    config.pop("name", None)
    drop_unread(config, config.get("strategy", TrainConfig().strategy))
    return _drop(config, NOT_THE_RESULT)


def field_identity(cfg) -> dict:
    """The identity as first defined (every non-default field, unread ones and ``name`` included);
    fold predictions were hashed with it for a while, so :func:`hash_matches` still accepts it."""
    return strip_defaults(_plain(cfg), _plain(type(cfg)()))


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg) -> str:
    """The hash saved with every fold's held-out predictions (``heldout.npz``)."""
    return identity_hash(config_identity(cfg))


# Keys added to TrainConfig after held-out predictions were first hashed, which the hash before
# identities left out at their defaults (docs/history/benchmarks.md tables were made with it).
LATER_KEYS = ("model.attention", "model.pos_embed", "model.global_pool", "model.n_last_blocks", "model.init",
              "strategy", "probe")


# REMOVED_KEYS (training.config): keys removed from TrainConfig since then, with their default (no shipped
# recipe set another): put back for the legacy hash, so those predictions survive the removal of a field nothing read.


def legacy_config_hash(cfg: TrainConfig) -> str:
    d, default = config_to_dict(cfg), config_to_dict(TrainConfig())
    for dotted, value in REMOVED_KEYS.items():
        *parents, leaf = dotted.split(".")
        here = d
        for part in parents:
            here = here[part]
        here.setdefault(leaf, value)
    for dotted in LATER_KEYS:
        *parents, leaf = dotted.split(".")
        here, there = d, default
        for part in parents:
            here, there = here[part], there[part]
        if here.get(leaf) == there[leaf]:
            del here[leaf]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def hash_matches(saved: str, cfg) -> bool:
    """Does a saved hash (today's or the legacy one) belong to ``cfg``?"""
    if saved == config_hash(cfg):
        return True
    return isinstance(cfg, TrainConfig) and saved in (identity_hash(field_identity(cfg)), legacy_config_hash(cfg))


_DEFAULT = "<default>"


def differing_keys(before: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two identities, as ``key: old -> new`` lines."""
    lines = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key, _DEFAULT), now.get(key, _DEFAULT)
        if isinstance(a, dict) or isinstance(b, dict):
            if all(isinstance(v, dict) or v is _DEFAULT for v in (a, b)):   # a section: name its leaves
                lines += differing_keys(a if isinstance(a, dict) else {}, b if isinstance(b, dict) else {},
                                        f"{prefix}{key}.")
                continue
        if a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def cache_identity(cache, where) -> dict:
    """What a benchmark's images and labels are: the sha256 checksums the cache's ``COMPLETE`` marker holds (pixels,
    index, meta), its image size and count. ``data`` (where it was) names the cache in messages and is not compared:
    a moved cache is the same cache. A cache without a marker (tests' in-memory caches) is hashed here."""
    sums = (getattr(cache, "checksums", None) or {}).get("sha256")
    if sums is None:
        sums = {"pixels": hashlib.sha256(np.ascontiguousarray(cache.pixels).tobytes()).hexdigest(),
                "index": hashlib.sha256(cache.index.to_csv(index=False).encode()).hexdigest()}
    return {"data": str(where), "size": int(cache.size), "n": int(len(cache)), "sha256": dict(sorted(sums.items()))}


def cache_differences(before: dict, now: dict) -> list[str]:
    """How two :func:`cache_identity` records differ, as ``key: old -> new`` lines; [] for the same cache."""
    return differing_keys({k: v for k, v in before.items() if k != "data"},
                          {k: v for k, v in now.items() if k != "data"})
