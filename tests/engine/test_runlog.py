"""metrics.jsonl: one clean run after a resume, NaN written as null, a torn last line ignored."""
import json

from cxrvit.engine.runlog import METRICS, RunLog, read_metrics


def test_resume_drops_records_after_the_checkpoint_and_fresh_start_clears(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 6):
        log.write({"kind": "train", "step": step, "loss": float("nan") if step == 2 else 1.0})
    log.close()
    assert json.loads((tmp_path / METRICS).read_text().splitlines()[1])["loss"] is None  # JSON has no NaN
    RunLog(tmp_path, resume_step=3).close()           # resumed from the step-3 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / METRICS)] == [1, 2, 3]
    RunLog(tmp_path).close()                          # a fresh run in the folder: no stale records
    assert not (tmp_path / METRICS).exists()
    RunLog(tmp_path, enabled=False).write({"step": 1})   # ranks other than 0 write nothing
    assert not (tmp_path / METRICS).exists()


def test_a_torn_last_line_ends_the_records(tmp_path):
    (tmp_path / METRICS).write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_metrics(tmp_path / METRICS) == [{"step": 1}, {"step": 2}]


def test_resume_also_drops_what_the_loop_says_its_checkpoint_does_not_cover(tmp_path):
    """An epoch-end val record at the step of a mid-epoch checkpoint, written after that checkpoint: the loop's
    ``keep`` drops it, so the resumed run's own val record for that epoch is the only one."""
    log = RunLog(tmp_path)
    for step in range(1, 5):
        log.write({"kind": "train", "step": step, "epoch": 0})
    log.write({"kind": "val", "step": 4, "epoch": 0})   # then killed before the epoch's checkpoint
    log.close()
    RunLog(tmp_path, resume_step=4, keep=lambda r: r["kind"] != "val" or r["epoch"] < 0).close()
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path / METRICS)] == [("train", s) for s in range(1, 5)]
