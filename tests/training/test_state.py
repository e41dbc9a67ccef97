import math
import random

import numpy as np
import torch
from torch import nn

from cxrvit.training import checkpointing as ckpt
from cxrvit.training.ema import ModelEMA
from cxrvit.training.engine import Progress, lr_at


def test_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0.1
    assert lr_at(9, 100, 10, 1.0, 0.0) == 1.0
    assert math.isclose(lr_at(55, 100, 10, 1.0, 0.0), 0.5)
    assert math.isclose(lr_at(100, 100, 10, 1.0, 0.01), 0.01)
    assert all(lr_at(s, 100, 10, 1.0, 0.0) >= lr_at(s + 1, 100, 10, 1.0, 0.0) for s in range(10, 99))


def test_ema_is_the_exponential_average_and_round_trips():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.75))
    state = ema.state_dict()
    other = ModelEMA(nn.Linear(2, 1, bias=False), decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 2 and other.decay == 0.5 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    target = nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.75))
    assert ModelEMA(model, decay=0.999).current_decay() == 0.1  # warm-up: (1 + 0) / (10 + 0)


def test_checkpoint_is_atomic_weights_only_and_restores_every_rng(tmp_path):
    ckpt.seed_everything(5)
    state = {"rng": ckpt.capture_rng(), "progress": Progress(step=3, history=[{"epoch": 0}]).to_dict(),
             "w": torch.arange(3)}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.atomic_torch_save(state, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    loaded = ckpt.load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.restore_rng(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert Progress.from_dict(loaded["progress"]).history == [{"epoch": 0}]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    try:
        ckpt.load_checkpoint(tmp_path / "last.pt")
    except ValueError as exc:
        assert "last.pt" in str(exc) and "not a readable" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_each_rank_gets_its_own_rng_back():
    states = []
    for rank in range(2):
        ckpt.seed_everything(100 + rank)
        states.append(ckpt.capture_rng())
    saved = {"rng": states[0], "rng_ranks": states}
    for rank in range(2):
        ckpt.restore_rng(states[rank])
        expected = torch.rand(3)
        ckpt.seed_everything(0)  # clobber the generators, as a fresh process has its own
        ckpt.restore_rng(ckpt.rng_for_rank(saved, rank, world_size=2))
        assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(states[0]["torch"], states[1]["torch"])
    # an older checkpoint, or one written by another number of processes: rank 0's, as before
    assert ckpt.rng_for_rank({"rng": states[0]}, 1, 2) is states[0]
    assert ckpt.rng_for_rank(saved, 1, world_size=4) is states[0]
