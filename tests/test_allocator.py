"""cxrvit.allocator: with freed memory kept, a large tensor allocated again costs no fresh pages."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from cxrvit import allocator, cli

# Each measurement runs in a fresh interpreter: the setting is process-wide, and a heap that an earlier test's
# in-process `cxrvit` command already grew serves later blocks whatever the setting.
PROBE = """
import resource, sys, torch
from cxrvit.allocator import keep_freed_memory
BLOCK = 96 * 2**20   # above glibc's 32 MiB mmap ceiling, like a 224-px batch-64 MLP activation (77 MiB)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_second_block():
    torch.empty(BLOCK // 4).fill_(1.0)        # allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK // 4).fill_(2.0)        # the same size again
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# The kept heap settles first: posix_memalign asks for a little more than a freed block's hole, so the first
# few blocks grow the heap (measured: 6 blocks, then every block reuses a freed one).
for _ in range(12):
    faults_of_second_block()
print(faults_of_second_block(), BLOCK // resource.getpagesize())
"""


def _faults(mode: str) -> tuple[int, int]:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    faults, pages = map(int, run.stdout.split())
    return faults, pages


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    faults, pages = _faults("system")   # glibc as it comes: the block is mmap'd, unmapped on free, mapped again
    assert faults > pages // 2
    faults, pages = _faults("keep")
    assert faults < pages // 20


def test_environment_opts_out(monkeypatch):
    monkeypatch.setenv(allocator.MALLOC_ENV, "system")
    assert allocator.keep_freed_memory.__wrapped__() is False


def test_the_command_line_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["data-summary", "/nonexistent/cache"]) == 1
    assert calls == [1]
    assert "/nonexistent/cache" in capsys.readouterr().err
