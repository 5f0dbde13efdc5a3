"""tnmoe.retain_freed_cpu_memory: freed large buffers are reused without page faults."""

import os
import subprocess
import sys

import pytest

import tnmoe

_PROBE = """
import resource, torch, tnmoe
def faults():  # minor page faults while filling a fresh 64 MiB tensor
    t = torch.empty(64 << 18)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t.fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# the last 4 of 8 refills: retained, the first few may still grow the heap (small objects
# allocated in between can take the start of the freed block)
default = sum([faults() for _ in range(8)][4:])
assert tnmoe.retain_freed_cpu_memory() and tnmoe.runtime.freed_cpu_memory_retained()
retained = sum([faults() for _ in range(8)][4:])
assert tnmoe.retain_freed_cpu_memory(False) and not tnmoe.runtime.freed_cpu_memory_retained()
print(default, retained)
"""


@pytest.mark.skipif(tnmoe.runtime._glibc() is None, reason="needs glibc")
def test_retained_memory_is_reused_without_page_faults():
    # in a child process: the setting is process-wide
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env=env).stdout
    default, retained = map(int, out.split())
    # glibc maps fresh pages for every large tensor by default (16384 faults per refill with
    # 4 KiB pages, fewer with transparent huge pages); retained, refills reuse them
    assert default > 0 and retained <= default // 20


def test_retain_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(tnmoe.runtime, "_glibc", lambda: None)
    assert tnmoe.retain_freed_cpu_memory() is False

