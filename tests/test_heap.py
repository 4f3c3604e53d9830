"""Freed memory kept in the process (legrace.trusted.heap): what `legrace train` and `legrace bench` set."""

import json
import os
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                reason="glibc's mallopt")

# Allocates, touches and frees a 64 MiB block, then a 48 MiB one (both over glibc's largest dynamic
# mmap threshold, 32 MiB), after keep_freed_memory() or not: the second block's page faults say
# whether the first one's pages were kept. (The second is smaller so that it fits the first's hole
# whatever glibc's memalign adds to a request of the same size.)
_PROBE = """
import json, resource, sys
import torch
from legrace.trusted.heap import how_kept, keep_freed_memory
how = keep_freed_memory() if sys.argv[1] == "keep" else how_kept()
faults = []
for size in (16 * 2**20, 12 * 2**20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(json.dumps({"how": how, "faults": faults}))
"""


def _probe(keep: bool, tunables: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", _PROBE, "keep" if keep else "default"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_kept_heap_reuses_a_freed_large_block_that_glibc_would_unmap():
    pages = 12 * 2**20 * 4 // 4096  # of the second block
    default = _probe(keep=False)
    assert default["how"] is None and default["faults"][1] >= pages  # mapped afresh
    kept = _probe(keep=True)
    assert kept["how"] == "mallopt"
    assert kept["faults"][0] >= pages and kept["faults"][1] < pages // 10  # the first block's pages, reused


@glibc_only
@pytest.mark.parametrize("tunables", ["glibc.malloc.tcache_count=0", "glibc.malloc.mmap_threshold=4294967296"])
def test_other_malloc_tunables_do_not_count_as_a_kept_heap(tunables):
    # a tcache tunable once made keep_freed_memory stand aside and report the heap kept, while
    # glibc's default thresholds unmapped every freed block (250 thousand faults a ResNet-18 step)
    result = _probe(keep=True, tunables=tunables)
    assert result["how"] == "mallopt" and result["faults"][1] < 12 * 2**20 * 4 // 4096 // 10
    assert _probe(keep=False, tunables=tunables)["how"] is None


@glibc_only
def test_glibc_tunables_are_left_as_the_environment_sets_them():
    tunables = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
    result = _probe(keep=True, tunables=tunables)
    assert result["how"] == "GLIBC_TUNABLES" and result["faults"][1] < 12 * 2**20 * 4 // 4096 // 10


# Two 1.2 GiB blocks from the heap (malloc'd, never touched, so the probe costs no memory), freed
# into its top: how much of the top glibc then gives back to the OS (sbrk falls). A 2 GiB trim
# threshold, what keep_freed_memory once set, gave it all back, so the steps after a TEE-only step
# that freed over 2 GiB faulted their pages afresh.
_TRIM_PROBE = """
import ctypes, json, sys
from legrace.trusted import heap
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes, libc.sbrk.restype, libc.sbrk.argtypes = (ctypes.c_void_p,), ctypes.c_void_p, (ctypes.c_ssize_t,)
if sys.argv[1] == "keep":
    heap.keep_freed_memory()
else:  # the thresholds keep_freed_memory set before
    assert heap.set_malloc_thresholds(heap.LARGEST, heap.LARGEST)
start = libc.sbrk(0)
blocks = [libc.malloc(1200 * 2**20) for _ in range(2)]
top = libc.sbrk(0)
for block in reversed(blocks):
    libc.free(block)
print(json.dumps({"grown": top - start, "given_back": top - libc.sbrk(0)}))
"""


@glibc_only
@pytest.mark.parametrize("how", ["keep", "2 GiB trim threshold"])
def test_kept_heap_never_gives_its_top_back(how):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE, how], env=env, capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # both blocks came from the heap, not from mmap (less what free room its top already had)
    assert result["grown"] > 2 * 2**30
    if how == "keep":
        assert result["given_back"] == 0
    else:  # the probe can tell: the old setting gave the freed top back
        assert result["given_back"] > 2 * 2**30


def test_bench_keeps_the_heap_unless_told_not_to(monkeypatch, tmp_path):
    from legrace.bench import runner as bench
    from legrace.cli import main

    calls = []
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: {})
    assert main(["bench", "--model", "cnn", "--out", str(tmp_path / "a")]) == 0
    assert calls == [1]
    assert main(["bench", "--model", "cnn", "--no-keep-heap", "--out", str(tmp_path / "b")]) == 0
    assert calls == [1]
