"""Data-parallel training under ``torchrun`` without DistributedDataParallel.

Why not DDP: a sandwich step runs four forward/backward passes (largest, smallest, two random
subnets) and takes one optimizer step. Under DDP every backward would all-reduce, unless the first
three ran under ``no_sync()``; and because every subnet leaves a different part of the elastic
weights unused, DDP would need ``find_unused_parameters=True``, which walks the autograd graph after
every forward and must merge the used-parameter bookkeeping of the ``no_sync`` passes with the last
one. All ranks sample the *same* subnets (the subnet sampler is seeded identically everywhere), so
the set of parameters that received gradients in a step is the same on every rank, and a single
all-reduce of the accumulated gradients after the four passes is exact: :func:`all_reduce_gradients`
flattens them into one buffer (plus the step's losses, so that a NaN on any rank stops every rank at
the same step) and averages them. Parameters start equal (:func:`broadcast_state` from rank 0 after
construction, loading and quantizer initialisation), so the ranks stay bit-identical. BatchNorm
running statistics are broadcast from rank 0 before every step, like DDP's ``broadcast_buffers``.
Backends: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def init_from_env() -> bool:
    """Join the process group described by the environment when ``WORLD_SIZE`` > 1.

    Returns True if this call created the group (the caller then destroys it with :func:`shutdown`).
    """
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30))
    return True


def shutdown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself without a process group): one decision for
    all ranks, e.g. a timing that differs between them."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


@torch.no_grad()
def broadcast_state(model: nn.Module, *, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
    if not is_distributed():
        return
    tensors = [] if buffers_only else [p.data for p in model.parameters()]
    tensors += [b for b in model.buffers()]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in by_dtype.values():
        if group[0].dtype == torch.bool:
            flat = _flatten_dense_tensors([t.to(torch.uint8) for t in group])
            dist.broadcast(flat, 0)
            for tensor, value in zip(group, _unflatten_dense_tensors(flat, group)):
                tensor.copy_(value.to(torch.bool))
        else:
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, 0)
            for tensor, value in zip(group, _unflatten_dense_tensors(flat, group)):
                tensor.copy_(value)


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, losses: torch.Tensor) -> torch.Tensor:
    """Average the accumulated gradients over all ranks; return the losses averaged likewise.

    Only parameters with a gradient take part (the same set on every rank, since every rank ran the
    same subnets). Non-finite values on any rank make the averaged losses non-finite everywhere.
    """
    if not is_distributed():
        return losses
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors([g.float() for g in grads] + [losses.detach().float().to(grads[0].device)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, value in zip(grads, _unflatten_dense_tensors(flat[: -losses.numel()], grads)):
        grad.copy_(value)
    return flat[-losses.numel() :].to(losses.device)
