"""One checkpoint name, one resume rule, every generator saved: the engine's checkpoint module."""
import random

import numpy as np
import pytest
import torch

from cxrvit.engine import checkpoint as ckpt


def test_checkpoint_is_atomic_weights_only_and_restores_every_rng(tmp_path):
    ckpt.seed_everything(5)
    views = torch.Generator().manual_seed(7)
    state = {"rng": ckpt.capture_rng({"views": views}), "progress": {"step": 3}, "w": torch.arange(3)}
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=views).item())
    ckpt.atomic_torch_save(state, tmp_path / ckpt.LAST)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    loaded = ckpt.load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside
    random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=views)
    ckpt.restore_rng(loaded["rng"], {"views": views})
    assert (random.random(), np.random.rand(), torch.rand(1).item(),
            torch.rand(1, generator=views).item()) == expected
    assert loaded["progress"] == {"step": 3}


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="last.pt.*not a readable"):
        ckpt.load_checkpoint(tmp_path / "last.pt")


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


CONFIG = {"name": "x", "optim": {"lr": 1e-3}, "engine": {"device": "cpu", "seed": 0}, "probe": {"k": 5}}


def _write_run(folder, config=CONFIG, step=4):
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_torch_save({"config": config, "step": step}, folder / ckpt.LAST)


def test_resume_rule_fresh_folder_starts_fresh_either_way(tmp_path):
    assert ckpt.open_run(tmp_path / "new", resume=False, config=CONFIG) is None
    assert ckpt.open_run(tmp_path / "new", resume=True, config=CONFIG) is None


def test_resume_rule_refuses_an_existing_run_unless_asked(tmp_path):
    _write_run(tmp_path)
    with pytest.raises(FileExistsError, match=r"already holds a run \(last.pt\).*--resume"):
        ckpt.open_run(tmp_path, resume=False, config=CONFIG)
    assert ckpt.open_run(tmp_path, resume=True, config=CONFIG)["step"] == 4


def test_resume_rule_refuses_another_config_naming_the_key_except_free_ones(tmp_path):
    _write_run(tmp_path)
    changed = {**CONFIG, "optim": {"lr": 2e-3}, "engine": {"device": "cuda", "seed": 0}}
    with pytest.raises(ValueError, match=r"last.pt: the run was started with a different config \(engine.device, "
                                         r"optim.lr differ\)"):
        ckpt.open_run(tmp_path, resume=True, config=changed)
    with pytest.raises(ValueError, match=r"optim.lr"):
        ckpt.open_run(tmp_path, resume=True, config=changed, free=("engine.device",))
    relaxed = {**CONFIG, "engine": {"device": "cuda", "seed": 0}, "probe": {"k": 20}}
    assert ckpt.open_run(tmp_path, resume=True, config=relaxed, free=("engine.device", "probe")) is not None


def test_a_checkpoint_of_the_old_ssl_loop_is_refused_naming_the_file(tmp_path):
    (tmp_path / ckpt.LEGACY_SSL_CHECKPOINT).write_bytes(b"old")
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"checkpoint.pt: a checkpoint of the pre-training loop before the "
                                             r"shared engine.*cannot be resumed"):
            ckpt.open_run(tmp_path, resume=resume, config=CONFIG)


def test_a_saved_config_is_read_as_the_loop_reads_it_before_comparing(tmp_path):
    # A run started before a field existed: the loop's parser gives it the default, so it still resumes.
    _write_run(tmp_path, config={k: v for k, v in CONFIG.items() if k != "probe"})
    with_default = lambda saved, source: {**saved, "probe": saved.get("probe", {"k": 5})}  # noqa: E731
    assert ckpt.open_run(tmp_path, resume=True, config=CONFIG, parse=with_default) is not None
    with pytest.raises(ValueError, match="probe.k differ"):
        ckpt.open_run(tmp_path, resume=True, config=CONFIG)
