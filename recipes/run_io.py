"""What every recipe run shares on its way in and out: the user-error type and the one-line exit,
seeding, wall-clock timing and results written all-or-nothing.

Imports nothing from the other recipe modules, so any of them can import it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import tnmoe
import tnmoe.moe as moe


class RecipeError(Exception):
    """A user error: printed as one line, exit status 2, nothing written."""


#: recipe options that name local data (a file, or a folder of files)
DATA_PATH_OPTIONS = ("--data-dir", "--train-file", "--validation-file", "--test-file")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_fingerprint(path: str | os.PathLike) -> dict[str, str] | None:
    """SHA-256 of a data file (``{"": hash}``) or of every file in a data folder
    (``{relative path: hash}``); ``None`` if ``path`` does not exist."""
    path = Path(path)
    if path.is_file():
        return {"": _sha256(path)}
    if path.is_dir():
        return {f.relative_to(path).as_posix(): _sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return None


def data_fingerprint(argv: list[str]) -> dict[str, dict[str, str]]:
    """``{option: path_fingerprint}`` for the :data:`DATA_PATH_OPTIONS` in ``argv`` that name
    existing paths: what a run read, so a study never reuses a run made on other data that
    happens to have the same file name."""
    out = {}
    for i, token in enumerate(argv):
        key, _, inline = token.partition("=")
        if key in DATA_PATH_OPTIONS:
            value = inline or (argv[i + 1] if i + 1 < len(argv) else None)
            fingerprint = path_fingerprint(value) if value else None
            if fingerprint is not None:
                out[key] = fingerprint
    return out


def run_main(main: Callable[[], object], retain_cpu_memory: bool = True) -> None:
    """Run ``main()``, turning :class:`RecipeError` into a one-line message and exit status 2.

    A recipe run as a program first calls :func:`tnmoe.retain_freed_cpu_memory` (CPU training
    steps of MPO models 5-15% faster, measured; glibc only, a no-op elsewhere)."""
    if retain_cpu_memory:
        tnmoe.retain_freed_cpu_memory()
    try:
        main()
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, seconds) and ``t.cpu_seconds``
    (this process's CPU time, all threads: with one thread, not inflated by the process being
    paused or waiting for a core; contention for caches and memory bandwidth still shows).
    Entering the same timer again (not while it runs) adds to both."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> "Timer":
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self.t0
        self.cpu_seconds += time.process_time() - self.cpu0


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path`` only on success, so a
    failed run leaves nothing half-written."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def write_rows(rows: list[dict], base: Path) -> None:
    """``base.json`` and ``base.csv`` with the same rows (lists/dicts JSON-encoded in the CSV)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(base.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})


def finish_run(out: Path, result: dict, model: torch.nn.Module, tokenizer, save_model: bool) -> None:
    """Write ``results.json`` (and, with ``save_model``, the model + tokenizer under ``model/``:
    tnmoe's format for a converted model, the HF format for a dense one) into ``out``."""
    shutil.rmtree(out / "trainer", ignore_errors=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if save_model:
        if moe.get_moe_config(model) is not None:
            moe.save_pretrained(model, out / "model")
        else:
            model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
