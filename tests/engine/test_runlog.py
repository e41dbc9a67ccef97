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
