import sys

import pytest
import torch

from lpq.memory import release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_medium_allocations_go_back_to_the_os():
    """64 KiB tensors live in the C heap; freeing every other one leaves holes glibc keeps until trimmed."""
    keep = [torch.ones(16 * 1024) for _ in range(1600)]     # 100 MiB in 64 KiB pieces
    del keep[::2]
    before = _rss_mb()
    assert release_freed_memory()
    assert _rss_mb() < before - 20
    assert len(keep) == 800
