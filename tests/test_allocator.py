"""convert/allocator.py: freed memory stays in the training process (glibc's malloc)."""

import json
import subprocess
import sys

CHILD = """
import json, os, sys
keep = sys.argv[1] == "keep"
if keep:
    from convert.allocator import keep_freed_memory
    assert keep_freed_memory()
import torch

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
blocks = [torch.ones(4 * 2**20) for _ in range(8)]  # 8 blocks of 16 MiB, each above glibc's default mmap threshold
del blocks
after_free = rss()
print(json.dumps({"kept_mib": (after_free - before) / 2**20}))
"""


def kept_after_free(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["kept_mib"]


def test_freed_blocks_stay_in_the_process_only_when_asked():
    # glibc returns large freed blocks to the kernel by default (their pages fault again on
    # the next allocation); after keep_freed_memory() the 128 MiB stay resident for reuse.
    assert kept_after_free("default") < 32
    assert kept_after_free("keep") > 96
