"""Spawned worker of ``test_reliability``'s one-rank gradient mask test: imports only torch and
the gradient mask, so the two interpreters start fast."""

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tnmoe.moe.gradient_mask import GradientMask


def one_rank_applies(rank: int, world: int, port: int, out_dir: str, timeout: float) -> None:
    """Rank 0 applies a mask (``timeout`` seconds) that the other ranks never apply; it writes
    ``seconds waited\\nerror message`` (or ``returned``) to ``out_dir/rank0.txt``. The other ranks
    wait for that file (60 s at most). No teardown: rank 0's broadcast is still pending."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    done = Path(out_dir) / "rank0.txt"
    if rank == 0:
        mask = GradientMask([nn.Parameter(torch.zeros(3))], p_b=0.5, timeout=timeout)
        start = time.monotonic()
        try:
            mask.apply()
            outcome = "returned"
        except RuntimeError as err:
            outcome = f"{time.monotonic() - start:.2f}\n{err}"
        done.write_text(outcome)
    else:
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(0)
