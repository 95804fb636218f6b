"""sae_dist.host_memory: with freed memory kept, a loop that allocates and frees large tensors stops faulting its
pages in afresh at every allocation; released, the kept memory leaves the resident set."""

import subprocess
import sys

LOOP = """
import resource, sys, torch
from sae_dist.host_memory import keep_freed_host_memory
assert keep_freed_host_memory(sys.argv[1] == "keep")
torch.ones(2**24)  # 64 MiB, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(2**24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(setting: str) -> int:
    return int(subprocess.run([sys.executable, "-c", LOOP, setting], capture_output=True, text=True,
                              check=True).stdout)


def test_kept_memory_is_reused_without_page_faults():
    pages_per_tensor = 2**26 // 4096
    default = minor_faults("default")
    assert default >= 18 * pages_per_tensor  # every one of the 20 allocations maps and faults its pages again
    assert minor_faults("keep") <= default / 4  # one to three tensors' pages in all, measured


RELEASE = """
import gc, torch
from pathlib import Path
from sae_dist.host_memory import keep_freed_host_memory, release_freed_host_memory

def resident():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

assert keep_freed_host_memory()
start = resident()
tensors = [torch.ones(2**24) for _ in range(4)]  # 256 MiB, written
del tensors
gc.collect()
kept = resident() - start
assert release_freed_host_memory()
print(kept, resident() - start)
"""


def test_released_memory_leaves_the_resident_set():
    kept, released = map(int, subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert kept >= 2**28 * 0.9  # freed, yet still resident: kept for reuse
    assert released <= 2**28 * 0.1
