"""cxrvit.allocator: with freed memory kept, a large tensor allocated again costs no fresh pages."""
from __future__ import annotations

import platform
import resource

import pytest
import torch

from cxrvit import allocator, cli

BLOCK = 96 * 2**20   # above glibc's 32 MiB mmap ceiling, like a 224-px batch-64 MLP activation (77 MiB)


def _faults_of_second_block() -> int:
    """Minor page faults while a second block of BLOCK bytes is allocated and written, after a first one is freed."""
    torch.empty(BLOCK // 4).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK // 4).fill_(2.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    pages = BLOCK // resource.getpagesize()
    try:
        assert allocator.configure_malloc(keep=False)   # glibc's own steady state: the block is mmap'd, then unmapped
        assert _faults_of_second_block() > pages // 2
        assert allocator.configure_malloc(keep=True)
        # The heap settles first: posix_memalign asks for a little more than a freed block's hole, so the
        # first few blocks grow the heap (measured: 6 blocks, then every block reuses a freed one).
        for _ in range(12):
            _faults_of_second_block()
        assert _faults_of_second_block() < pages // 20
    finally:
        allocator.configure_malloc(keep=False)


def test_environment_opts_out(monkeypatch):
    monkeypatch.setenv(allocator.MALLOC_ENV, "system")
    assert allocator.keep_freed_memory.__wrapped__() is False


def test_the_command_line_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["data-summary", "/nonexistent/cache"]) == 1
    assert calls == [1]
    assert "/nonexistent/cache" in capsys.readouterr().err
