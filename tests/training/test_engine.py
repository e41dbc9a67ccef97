import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from trainhelp import TINY
from cxrvit.cli import main as cli_main
from cxrvit.engine import distributed
from cxrvit.engine.core import Engine
from cxrvit.inference.bundle import load_bundle
from cxrvit.model.checkpoints import CheckpointError
from cxrvit.training import engine
from cxrvit.training.linear_probe import fit_linear_probe
from cxrvit.training.commands import choose_rows
from cxrvit.training.config import load_recipe
from cxrvit.training.engine import NonFiniteLossError, train




@pytest.fixture(scope="module")
def tiny_run(tiny_reference_run):
    return tiny_reference_run


def test_rows_come_from_official_train_val_and_are_patient_disjoint(tiny_cache):
    tr, va, how = choose_rows(tiny_cache, 0.2, 0)
    split = tiny_cache.index["official_split"].to_numpy()
    assert "official split" in how
    assert (split[tr] == "train_val").all() and (split[va] == "train_val").all()
    assert not set(tiny_cache.patient_ids[tr]) & set(tiny_cache.patient_ids[va])


def test_run_writes_a_loadable_bundle_with_val_thresholds(tiny_run, tiny_cache):
    cfg, tr, va, out = tiny_run
    bundle = load_bundle(out)
    assert bundle.labels == cfg.data.labels and bundle.preprocessing.size == 32
    # predict squares a file to the cache's side first, as training saw it (one image, one answer)
    assert bundle.preprocessing.source_size == tiny_cache.size
    assert set(bundle.thresholds) == set(cfg.data.labels)
    names = tiny_cache.index["image"].to_numpy()
    assert bundle.threshold_source["split"] == "val"
    assert sorted(bundle.threshold_source["images"]) == sorted(names[va])
    assert bundle.threshold_source["patients"] == sorted(set(tiny_cache.patient_ids[va].astype(str)))
    assert bundle.config["name"] == "finetune"
    # the bundle holds the best-on-validation (EMA) weights
    best = load_file(str(out / engine.BEST))
    assert all(torch.equal(best[k], v.float()) for k, v in bundle.model.state_dict().items())
    probs = bundle.predict_proba(torch.from_numpy(np.asarray(tiny_cache.pixels[va[:4]])).unsqueeze(1))
    assert probs.shape == (4, len(cfg.data.labels)) and ((probs >= 0) & (probs <= 1)).all()


def test_logs_have_train_and_val_records_and_curves(tiny_run):
    cfg, tr, va, out = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["epoch"] for r in val] == [0, 1]
    assert set(val[0]["f1"]) == {"Atelectasis", "Effusion", "Mass/Nodule"} and len(val[0]["auroc"]) == 15
    assert all(np.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["lr"] > 0 for r in train_recs)
    assert [r["step"] for r in train_recs] == list(range(1, len(train_recs) + 1))
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "config.yaml").read_text().startswith("name: finetune")
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["training"]["best_epoch"] in (0, 1) and meta["training"]["weights"] == "ema"


def test_refuses_to_overwrite_a_run_without_resume(tiny_run, tiny_cache):
    cfg, tr, va, out = tiny_run
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(cfg, tiny_cache, tr, va, out, progress=False)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_cache, tmp_path, monkeypatch, one_thread):
    real = engine.build_loss

    class NanOnFifthCall(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, logits, y):
            self.calls += 1
            value = self.inner(logits, y)
            return value * float("nan") if self.calls == 5 else value

    def nan_on_fifth_call(cfg, targets=None):
        return NanOnFifthCall(real(cfg, targets))

    monkeypatch.setattr(engine, "build_loss", nan_on_fifth_call)
    cfg = load_recipe("baseline", TINY)
    tr, va, _ = choose_rows(tiny_cache, cfg.data.val_fraction, cfg.data.split_seed)
    with pytest.raises(NonFiniteLossError, match=r"at step 5 \(epoch 1, batch 0\)"):
        train(cfg, tiny_cache, tr, va, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 4  # the end-of-epoch-0 checkpoint survives
    assert not (tmp_path / "model.safetensors").exists()


def test_init_loads_a_backbone_and_keeps_a_fresh_head(tiny_run, tiny_cache, tmp_path):
    cfg, tr, va, out = tiny_run
    trained = load_file(str(out / "model.safetensors"))  # a cxrvit bundle is a valid --init source
    trainer = engine.Trainer(cfg, tiny_cache, tr, va, tmp_path / "run", out / "model.safetensors",
                             distributed.DistContext(), False, False)
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained if not k.startswith("head."))
    assert not torch.equal(state["head.weight"], trained["head.weight"])  # fine-tuning starts a new head
    assert trainer.init_report is not None


def test_cli_errors_are_clear_and_exit_2(tiny_cache_dir, tmp_path, capsys):
    from cxrvit.cli import main

    assert main(["train", "--recipe", "baseline", "--data", str(tiny_cache_dir), "--out", str(tmp_path / "a"),
                 "--set", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--recipe", "baseline", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "b")]) == 2
    assert "cannot open the cache" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "never-ran")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    # a recipe's backbone file (model.init) that is not there: named, and nothing written
    assert main(["train", "--recipe", "probe-random", "--data", str(tiny_cache_dir), "--out", str(tmp_path / "c"),
                 "--set", "model.init=nowhere/backbone.safetensors"]) == 2
    assert "model.init=nowhere/backbone.safetensors, which is not a file here" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_each_ranks_share_must_divide_by_grad_accum(tiny_cache, tmp_path):
    """12 images over 2 processes is 6 each: grad_accum=4 would chunk them into 3 micro-batches, all under
    no_sync, and the ranks would never all-reduce. Refused, naming both keys (the world size is known here)."""
    cfg = load_recipe("baseline", TINY + ["schedule.batch_size=12", "schedule.grad_accum=4"])
    tr, va, _ = choose_rows(tiny_cache, cfg.data.val_fraction, cfg.data.split_seed)
    with pytest.raises(ValueError, match=r"schedule.batch_size=12 over 2 processes is 6 images each, which "
                                         r"schedule.grad_accum=4 does not divide.*divisible by 8"):
        engine.Trainer(cfg, tiny_cache, tr, va, tmp_path / "run", None, distributed.DistContext(world_size=2),
                       False, False)
    # one process: 12 images in 4 micro-batches of 3 is fine
    engine.Trainer(cfg, tiny_cache, tr, va, tmp_path / "one", None, distributed.DistContext(), False, False)


def test_the_saved_config_names_the_file_the_run_started_from(tiny_run, tiny_init, tiny_cache, tmp_path):
    """--init (or an arm's stage) replaces the recipe's model.init: config.yaml and the bundle used to keep the
    recipe's file, or "", and so named a start the run never had."""
    cfg, tr, va, out = tiny_run
    assert cfg.model.init == ""   # the caller's config (an arm's identity) is left as it was
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init"] == str(tiny_init)
    assert load_bundle(out).config["model"]["init"] == str(tiny_init)
    # a recipe naming one backbone file, run with --init another: the record names the one used
    probe = load_recipe("probe-random", ["model.arch=vit_tiny", "model.img_size=32", "probe.c_grid=[1.0]",
                                         "model.init=the-recipes-own.safetensors"])
    run = train(probe, tiny_cache, tr, va, tmp_path / "probe", init=str(tiny_init), progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init"] == str(tiny_init)
    assert load_bundle(run).config["model"]["init"] == str(tiny_init)
    # a checkpoint written before the config recorded --init (model.init "") still resumes: the start file is
    # free on resume, the checkpoint carries the weights
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"]["model"]["init"] = ""
    copy = tmp_path / "old"
    copy.mkdir()
    torch.save(state, copy / "last.pt")
    trainer = engine.Trainer(replace(cfg, model=replace(cfg.model, init=str(tiny_init))), tiny_cache, tr, va, copy,
                             str(tiny_init), distributed.DistContext(), True, False)
    assert trainer.progress.step == state["progress"]["step"] and trainer.init_report is None


def test_init_that_loads_no_backbone_weight_is_refused_by_every_strategy(tiny_run, tiny_cache, tmp_path):
    """A pre-training method's state_dict (``encoder.*`` keys) used to train from random init, silently."""
    cfg, tr, va, out = tiny_run
    weights = load_file(str(out / "model.safetensors"))
    torch.save({f"encoder.{k}": v for k, v in weights.items()}, tmp_path / "method_state.pt")
    with pytest.raises(CheckpointError, match=r"method_state.pt: none of its tensors.*encoder\.\*"):
        engine.Trainer(cfg, tiny_cache, tr, va, tmp_path / "run", tmp_path / "method_state.pt",
                       distributed.DistContext(), False, False)
    probe = load_recipe("probe-random", ["model.arch=vit_tiny", "model.img_size=32"])
    with pytest.raises(CheckpointError, match=r"method_state.pt: none of its tensors"):
        fit_linear_probe(probe, tiny_cache, tr, va, tmp_path / "probe", init=tmp_path / "method_state.pt",
                         progress=False)


def test_a_val_record_written_after_the_last_checkpoint_is_not_duplicated_on_resume(
        tiny_cache, tmp_path, monkeypatch, one_thread):
    """Epoch 0 ends at step 4, which is also a mid-epoch checkpoint (checkpoint_every=4): killed after the
    epoch's val record but before its end-of-epoch checkpoint, the resumed run validates epoch 0 again."""
    sets = TINY + ["engine.checkpoint_every=4"]
    cfg = load_recipe("baseline", sets)
    tr, va, _ = choose_rows(tiny_cache, cfg.data.val_fraction, cfg.data.split_seed)
    real, calls = Engine.save, []

    class Killed(Exception):
        pass

    def save_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:   # the end-of-epoch-0 checkpoint, after epoch 0's val record
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "save", save_then_die)
    with pytest.raises(Killed):
        train(cfg, tiny_cache, tr, va, tmp_path, progress=False)
    monkeypatch.setattr(Engine, "save", real)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["progress"]["epoch"] == 0
    train(load_recipe("baseline", sets), tiny_cache, tr, va, tmp_path, resume=True, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records if r["kind"] == "val"] == [(0, 4), (1, 8)]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))


def test_resume_with_a_broken_saved_config_names_the_file_and_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: [vit_tiny\n")   # not YAML
    assert cli_main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'config.yaml'}: not valid YAML" in capsys.readouterr().err
    (run / "config.yaml").write_text("schedule:\n  epochs: 0\n")   # YAML, a value validate refuses
    assert cli_main(["train", "--resume", str(run)]) == 2
    assert f"{run / 'config.yaml'}: config schedule.epochs=0: must be >= 1" in capsys.readouterr().err
