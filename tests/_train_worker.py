"""Worker of the two-process training test (tests/test_train.py), in its own light module: a
spawned process imports only this, not the whole test module with its imports."""

from __future__ import annotations

import os
from pathlib import Path


def train_rank(rank: int, world: int, port: int, run: str, out: str, config: dict) -> None:
    """Train as rank ``rank`` of ``world`` (gloo, env://) and save what the rank ended with."""
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    from spaceevo.train.config import TrainConfig
    from spaceevo.train.loop import train_supernet

    result = train_supernet("tiny-1111-0000", run, config=TrainConfig.from_dict(config), progress=False)
    assert not torch.distributed.is_initialized(), "the library destroys the process group it created"
    torch.save(
        {"history": list(result.history), "images": result.train_images, "state": result.supernet.state_dict()},
        Path(out) / f"result{rank}.pt",
    )
