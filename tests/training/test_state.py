"""The supervised loop's own state: the EMA and the progress counters (the schedule, checkpoints and
generators are the engine's: tests/engine)."""
import torch
from torch import nn

from cxrvit.training.ema import ModelEMA
from cxrvit.training.engine import Progress


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


def test_progress_round_trips_through_a_weights_only_dict():
    p = Progress(step=3, epoch=1, batch=2, best_score=0.5, best_epoch=0, history=[{"epoch": 0}])
    back = Progress.from_dict(p.to_dict())
    assert back == p and all(isinstance(v, (int, float, str)) for v in p.to_dict().values())
