"""Reuse of large host buffers while training: a freed 64 MB block is handed out again
without the kernel faulting its pages in anew (counted, not timed), and the memory kept
for reuse is given back to the system when the context ends."""

from __future__ import annotations

import resource

import pytest
import torch

from sclatent._host_memory import _glibc, reuse_large_host_buffers

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the allocator tuning applies to glibc's malloc (Linux) only")

SIZE = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MB)
PAGES = SIZE // resource.getpagesize()


def _faults_of_refilling(times: int = 4, size: int = SIZE) -> int:
    """Minor page faults of making, filling and freeing a ``size``-byte array ``times`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.empty(size, dtype=torch.uint8)  # torch's CPU allocator: malloc, no huge-page advice
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_freed_large_blocks_are_reused_inside():
    outside = _faults_of_refilling()
    assert outside > 3 * PAGES  # every new block is faulted in again (fresh mmap)
    with reuse_large_host_buffers() as raised:
        assert raised
        _faults_of_refilling(2)  # the heap grows to hold the block (once or twice, by its layout)
        inside = _faults_of_refilling()
    assert inside < 0.5 * PAGES  # then it is reused from the heap, not faulted in again


def test_the_kept_memory_is_given_back_when_the_context_ends():
    big = 4 * SIZE
    with reuse_large_host_buffers():
        _faults_of_refilling(1, big)  # freed, but kept in the heap for reuse
        kept = _resident_bytes()
    assert kept - _resident_bytes() > big // 2  # malloc_trim returned it


def test_disabled_leaves_the_allocator_alone():
    with reuse_large_host_buffers(enabled=False) as raised:
        assert not raised
        assert _faults_of_refilling() > 3 * PAGES
