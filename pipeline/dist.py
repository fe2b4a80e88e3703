"""torchrun environment, read once; single process when absent."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env() -> DistEnv:
    """Rank, local rank and world size from the torchrun variables (defaults: one process)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init(env_: DistEnv | None = None) -> DistEnv:
    """Initialise the process group when running under torchrun (gloo on CPU, NCCL on GPU)."""
    env_ = env_ or env()
    if env_.distributed and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env_.local_rank)
        torch_dist.init_process_group(backend=backend)
    return env_


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def device(env_: DistEnv | None = None) -> torch.device:
    env_ = env_ or env()
    if torch.cuda.is_available():
        return torch.device("cuda", env_.local_rank)
    return torch.device("cpu")


def my_items(n: int, rank: int, world: int) -> list[int]:
    """Indices 0..n-1 this rank owns (round robin): fixed by (n, rank, world) only."""
    return list(range(rank, n, world))
