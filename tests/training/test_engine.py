import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainhelp import TINY
from cxrvit.inference.bundle import load_bundle
from cxrvit.training import engine
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
    assert set(bundle.thresholds) == set(cfg.data.labels)
    names = tiny_cache.index["image"].to_numpy()
    assert bundle.threshold_source["split"] == "val"
    assert sorted(bundle.threshold_source["images"]) == sorted(names[va])
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
    from cxrvit.engine import distributed

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
