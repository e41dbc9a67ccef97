"""Continued pre-training (``init``): a run starts from an earlier run's ``last.pt``, weights only."""
import pytest
import torch

from cxrvit.engine.checkpoint import load_checkpoint
from cxrvit.ssl.pretrain import build_method, pretrain
from sslfakes import tiny_config


def _method_weights(run):
    return load_checkpoint(run / "last.pt")["method"]


def test_continued_run_starts_from_the_earlier_runs_weights_with_fresh_schedules(tiny_cache, tmp_path):
    first = tiny_config("mae", schedule={"epochs": 1, "batch_size": 16})
    pretrain(first, [tiny_cache], tmp_path / "first", quiet=True)
    # lr 0 all the way (AdamW's decay is lr-scaled too): a continuation that loaded the weights ends on them.
    frozen = tiny_config("mae", init=str(tmp_path / "first" / "last.pt"), schedule={"epochs": 1, "batch_size": 16},
                         optim={"lr": 0.0, "min_lr": 0.0, "warmup_epochs": 0})
    res = pretrain(frozen, [tiny_cache], tmp_path / "frozen", quiet=True)
    a, b = _method_weights(tmp_path / "first"), _method_weights(tmp_path / "frozen")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)       # encoder and decoder alike
    assert res.steps == 3 and load_checkpoint(tmp_path / "frozen" / "last.pt")["step"] == 3   # its own count
    # With the recipe's lr it trains on from there: every weight still close to the start, none equal.
    moving = tiny_config("mae", init=str(tmp_path / "first" / "last.pt"), schedule={"epochs": 1, "batch_size": 16})
    pretrain(moving, [tiny_cache], tmp_path / "moving", quiet=True)
    c = _method_weights(tmp_path / "moving")
    torch.manual_seed(1)
    random = build_method(moving).state_dict()
    key = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(c[key], a[key])
    assert (c[key] - a[key]).abs().max() < 0.1 * (random[key] - a[key]).abs().max()


def test_a_continued_run_resumes_even_when_its_init_file_has_moved(tiny_cache, tmp_path):
    pretrain(tiny_config("mae", schedule={"epochs": 1, "batch_size": 16}), [tiny_cache], tmp_path / "first", quiet=True)
    moved = tmp_path / "elsewhere.pt"
    cfg = tiny_config("mae", init=str(moved), schedule={"epochs": 2, "batch_size": 16, "max_steps": 2})
    (tmp_path / "first" / "last.pt").rename(moved)
    pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    moved.unlink()
    # the resume reads its own last.pt; where step 0 came from is history
    done = pretrain(tiny_config("mae", init=str(moved), schedule={"epochs": 2, "batch_size": 16}), [tiny_cache],
                    tmp_path / "run", resume=True, quiet=True)
    assert done.steps == 6


ONE_EPOCH = {"epochs": 1, "batch_size": 16}


@pytest.mark.parametrize("make, message", [
    (lambda tmp, cache: tmp / "missing.pt", "no such file"),
    (lambda tmp, cache: _saved(tmp, {"format": "cxrvit-checkpoint/1", "model": {}}),
     "not a cxrvit pre-training checkpoint"),
    (lambda tmp, cache: _run(tmp, cache, tiny_config("dino", schedule=ONE_EPOCH)), "method 'dino'"),
    (lambda tmp, cache: _run(tmp, cache, tiny_config("mae", model={"depth": 1}, schedule=ONE_EPOCH)), "model.depth 1"),
    (lambda tmp, cache: _run(tmp, cache, tiny_config("mae", mae={"decoder_dim": 32, "decoder_heads": 4},
                                                     schedule=ONE_EPOCH)), "do not fit"),
])
def test_an_init_that_cannot_continue_is_refused_naming_the_file_before_anything_is_written(
        tiny_cache, tmp_path, make, message):
    path = make(tmp_path, tiny_cache)
    cfg = tiny_config("mae", init=str(path), schedule={"epochs": 1, "batch_size": 16})
    with pytest.raises(ValueError, match=message) as exc:
        pretrain(cfg, [tiny_cache], tmp_path / "run", quiet=True)
    assert str(path) in str(exc.value)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def _saved(tmp, obj):
    torch.save(obj, tmp / "other.pt")
    return tmp / "other.pt"


def _run(tmp, cache, cfg):
    pretrain(cfg, [cache], tmp / "earlier", quiet=True)
    return tmp / "earlier" / "last.pt"
