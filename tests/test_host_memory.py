"""Reuse of large host buffers while training: a freed 64 MB block is handed out again
without the kernel faulting its pages in anew (counted, not timed)."""

from __future__ import annotations

import resource

import pytest
import torch

from sclatent._host_memory import _glibc, reuse_large_host_buffers

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the allocator tuning applies to glibc's malloc (Linux) only")

SIZE = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MB)


def _faults_of_refilling(times: int = 4) -> int:
    """Minor page faults of making, filling and freeing a SIZE-byte array ``times`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.empty(SIZE, dtype=torch.uint8)  # torch's CPU allocator: malloc, no huge-page advice
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_large_blocks_are_reused_inside_and_not_after():
    pages = SIZE // resource.getpagesize()
    outside = _faults_of_refilling()
    assert outside > 3 * pages  # every new block is faulted in again (fresh mmap)
    with reuse_large_host_buffers() as raised:
        assert raised
        _faults_of_refilling(2)  # the heap grows to hold the block (once or twice, by its layout)
        inside = _faults_of_refilling()
    assert inside < 0.5 * pages  # then it is reused from the heap, not faulted in again
    after = _faults_of_refilling()
    assert after > 3 * pages  # thresholds back below the block size: fresh pages again


def test_disabled_leaves_the_allocator_alone():
    pages = SIZE // resource.getpagesize()
    with reuse_large_host_buffers(enabled=False) as raised:
        assert not raised
        assert _faults_of_refilling() > 3 * pages
