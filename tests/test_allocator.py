"""The allocator tuning of CPU training is safe to call any number of times."""

from __future__ import annotations

import platform

import torch

from spaceevo.train.allocator import keep_freed_memory


def test_keep_freed_memory_is_idempotent_and_tensors_still_work():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first
    big = torch.ones(64, 96, 32, 32)  # 25 MB: from the heap after the tuning
    del big
    assert float(torch.ones(64, 96, 32, 32).sum()) == 64 * 96 * 32 * 32
