"""Several processes filling one store: ``torchrun --nproc-per-node N -m fsl_cache extract ...``.

Each rank computes the shards ``s`` with ``s % world_size == rank`` (whole shards, no padding
duplicates); rank 0 alone writes the small arrays, creates the big ones and finalizes the manifest
once every rank is done. A single process is simply rank 0 of 1, with every collective a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import FslError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` from every rank, in rank order (a list of one without torchrun)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def raise_if_any(self, error: Exception | None) -> None:
        """Collective: if any rank failed, every rank raises (so none waits forever at a barrier)."""
        messages = self.gather(None if error is None else str(error))
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise FslError(f"rank {rank} failed: {message}")


SINGLE_PROCESS = Ranks()
"""A process that is rank 0 of 1: every collective is a no-op."""


def ranks_from_env() -> Ranks:
    """The ranks torchrun describes in the environment, joining its process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(device: str, ranks: Ranks) -> str:
    """``cuda`` means this rank's own GPU under torchrun."""
    return f"cuda:{ranks.local_rank}" if device == "cuda" and ranks.world_size > 1 else device
