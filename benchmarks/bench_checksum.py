"""What the weight-file checksum costs: ``tnmoe.models.persistence.file_checksum`` (XXH3-128)
and, for reference, SHA-256, against writing the file (``safetensors.torch.save_file``) and a warm
load (``load_file`` + copy into the model's tensors; the file is in the page cache). Interleaved
rounds, medians, seconds per GiB and ratios measured in one run.

    python benchmarks/bench_checksum.py --json results/benchmarks/checksum_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch
from _timing import interleaved, write_report
from safetensors.torch import load_file, save_file

from tnmoe.models.persistence import file_checksum


def _sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=0.5, help="file size in GiB (float32 tensors)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    numel = int(args.gib * 2**30 / 4)
    tensors = {f"t{i}": torch.randn(numel // 8) for i in range(8)}
    gib = sum(t.numel() * 4 for t in tensors.values()) / 2**30
    dst = {k: torch.empty_like(v) for k, v in tensors.items()}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_file(tensors, str(path))

        def warm_load():
            for k, v in load_file(str(path)).items():
                dst[k].copy_(v)

        times = interleaved({"save_file": lambda: save_file(tensors, str(path)),
                             "xxh3_128 (file_checksum)": lambda: file_checksum(path),
                             "sha256": lambda: _sha256(path), "warm load": warm_load},
                            repeats=args.repeats, warmup=1)
    per_gib = {k: v / gib for k, v in times.items()}
    rows = [{"case": k, "s_per_gib": round(v, 3), "vs_save": round(v / per_gib["save_file"], 3),
             "vs_warm_load": round(v / per_gib["warm load"], 3)} for k, v in per_gib.items()]
    print("| case | s/GiB | / save_file | / warm load |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['s_per_gib']:.3f} | {r['vs_save']:.2f}x | {r['vs_warm_load']:.2f}x |")
    write_report(args.json, device="cpu", tokens=0, rows=rows, extra={"file_gib": round(gib, 3)})


if __name__ == "__main__":
    main()
