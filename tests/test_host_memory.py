"""Reuse of large host buffers while training: a freed 64 MB block is handed out again
without the kernel faulting its pages in anew (counted, not timed), and the memory kept
for reuse is given back to the system when the context ends.

The allocator's state is the process's, and earlier tests leave free blocks in the heap
that would serve these requests, so each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from sclatent._host_memory import _glibc, reuse_large_host_buffers

#: the page-fault and resident-memory checks need glibc's malloc; the context is a no-op elsewhere
needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the allocator tuning applies to glibc's malloc (Linux) only")

SIZE = 64 * 1024 * 1024  # above glibc's largest dynamic mmap threshold (32 MB)
PAGES = SIZE // resource.getpagesize()

HELPERS = f"""
import json, resource, torch
from sclatent._host_memory import reuse_large_host_buffers
SIZE = {SIZE}

def refill(times=4, size=SIZE):
    # minor page faults of making, filling and freeing a size-byte array `times` times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        block = torch.empty(size, dtype=torch.uint8)  # torch's CPU allocator: malloc, no huge-page advice
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
"""


def _run(body: str) -> dict:
    done = subprocess.run([sys.executable, "-c", HELPERS + body], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_large_blocks_are_reused_inside_and_faulted_in_afresh_outside():
    out = _run("""
outside = refill(8)
with reuse_large_host_buffers() as raised:
    refill(2)  # the heap grows to hold the block (once or twice, by the address space's layout)
    inside = refill(8)
print(json.dumps({"outside": outside, "raised": raised, "inside": inside}))
""")
    assert out["raised"]
    assert out["outside"] > 7 * PAGES  # every new block is faulted in again (fresh mmap)
    # then it is reused from the heap: at most the odd regrowth when small allocations have
    # split the freed block (glibc serves them from it), not one fault-in per block
    assert out["inside"] < 2.5 * PAGES


@needs_glibc
def test_the_kept_memory_is_given_back_when_the_context_ends():
    out = _run("""
with reuse_large_host_buffers():
    refill(1, 4 * SIZE)  # freed, but kept in the heap for reuse
    kept = resident()
print(json.dumps({"released": kept - resident()}))
""")
    assert out["released"] > 2 * SIZE  # malloc_trim returned it


@needs_glibc
def test_disabled_leaves_the_allocator_alone():
    out = _run("""
with reuse_large_host_buffers(enabled=False) as raised:
    faults = refill()
print(json.dumps({"raised": raised, "faults": faults}))
""")
    assert not out["raised"]
    assert out["faults"] > 3 * PAGES


def test_the_context_says_whether_it_tuned_the_allocator():
    """On every platform: raised exactly where glibc is there, never when disabled."""
    with reuse_large_host_buffers() as raised:
        assert raised == (_glibc() is not None)
    with reuse_large_host_buffers(enabled=False) as raised:
        assert not raised
