"""The ``cxrvit`` entry point: a command's return code becomes the exit code; a worker of a multi-process
torchrun launch exits without interpreter finalization (cxrvit.engine.distributed.exit_process: gloo's worker
threads outlive destroy_process_group and can abort a finishing process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrvit.cli import run
from cxrvit.engine.distributed import multi_process

SRC = str(Path(__file__).resolve().parents[1] / "src")
# A failing command (exit code 1, message on stderr) and an atexit hook that shows whether finalization ran.
SCRIPT = ("import atexit, sys; from cxrvit.cli import run; atexit.register(print, 'finalized', flush=True); "
          "sys.argv = ['cxrvit', 'data-summary', sys.argv[1]]; print('before', flush=False); run()")


def _launch(tmp_path, world_size: str | None):
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "no-cache")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_run_exits_with_the_command_code(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["cxrvit", "data-summary", str(tmp_path / "no-cache")])
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 1


def test_only_a_multi_process_launch_counts_as_one(monkeypatch):
    for world, expected in ((None, False), ("1", False), ("2", True)):   # torchrun --nproc_per_node=1: one process
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert multi_process() is expected, world


@pytest.mark.parametrize("world_size, finalized", [(None, True), ("2", False)])
def test_a_multi_process_worker_skips_finalization_but_keeps_its_output(tmp_path, world_size, finalized):
    done = _launch(tmp_path, world_size)
    assert done.returncode == 1, done.stderr
    assert "not a complete cxrvit cache" in done.stderr   # stderr flushed before the exit
    assert done.stdout.startswith("before")              # so is buffered stdout
    assert ("finalized" in done.stdout) is finalized


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    # `cxrvit ... | head`: the pipe closes while the command still prints; this was a BrokenPipeError traceback
    # (twice: once more at the interpreter's last flush).
    missing = [str(tmp_path / f"missing-{i:05d}.dcm") for i in range(3000)]  # ~200 kB of output, > a pipe's buffer
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "cxrvit", "dicom-info", *missing], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
