"""Interleaved timing: run candidates round-robin and report medians and ratios."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 9, warmup: int = 2,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def write_report(path: str | None, *, device, tokens: int, rows: list[dict], extra: dict | None = None) -> None:
    """Write the benchmark's rows with the run's context (device, torch, threads) as JSON."""
    if not path:
        return
    import torch

    with open(path, "w") as fh:
        device = torch.device(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        json.dump({"device": str(device), "device_name": name, "tokens": tokens, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), **(extra or {}), "rows": rows}, fh, indent=2)
