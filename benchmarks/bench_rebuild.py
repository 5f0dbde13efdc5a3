"""The last step of an MPO rebuild: GEMM + permutation to ``(out, in)``, blocked vs one go.

Eight experts' 3072x768 up-projection matrices (factors 4,4,8,6,4 / 3,4,4,4,4, the MoE layer
benchmark's), rebuilt as ``(L @ C) @ R`` with a shared centre: the final GEMM
``(E, o_L i_L o_c i_c, r') x (E, r', o_R i_R)`` and the permutation of its product. Rows, each
at 1 and at 2 threads, for bond 64 and lossless (``r' = 384``):

  * ``forward``: :func:`tnmoe.networks.matmul_permute` blocked (``BLOCK_BYTES``) / one go
  * ``train``: the same, forward + backward
  * ``gemm_only``: the final GEMM without any permutation / one go (what blocking can approach)

Interleaved medians in one process, ratios per thread count.

    python benchmarks/bench_rebuild.py [--repeats 9] [--json F]
"""

from __future__ import annotations

import argparse

import torch

from _timing import interleaved, write_report
from tnmoe import retain_freed_cpu_memory
from tnmoe.networks import matmul_permute
from tnmoe.networks.blocked import BLOCK_BYTES

E = 8
O_L, I_L, O_C, I_C, O_R, I_R = 16, 12, 8, 4, 24, 16  # (4*4, 3*4), (8, 4), (6*4, 4*4)
ROWS, COLS, PERM = (O_L, I_L, O_C, I_C), (O_R, I_R), (0, 2, 4, 1, 3, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    retain_freed_cpu_memory()
    threads_before = torch.get_num_threads()
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for bond in (64, 384):
            g = torch.Generator().manual_seed(0)
            a = torch.randn(E, O_L * I_L * O_C * I_C, bond, generator=g, requires_grad=True)
            b = torch.randn(E, bond, O_R * I_R, generator=g, requires_grad=True)
            probe = torch.randn(E, O_L, O_C, O_R, I_L, I_C, I_R, generator=g)

            def run(block_bytes, backward):
                def f():
                    out = matmul_permute(a, b, ROWS, COLS, PERM, block_bytes=block_bytes)
                    if backward:
                        torch.autograd.grad(out, (a, b), probe)
                return f

            one_go = 2**62  # a block larger than the product: the one-go path
            fns = {"forward_blocked": run(BLOCK_BYTES, False), "forward_one_go": run(one_go, False),
                   "train_blocked": run(BLOCK_BYTES, True), "train_one_go": run(one_go, True),
                   "gemm_only": lambda: torch.bmm(a.detach(), b.detach())}
            t = interleaved(fns, repeats=args.repeats, warmup=2)
            name = "bond64" if bond == 64 else "lossless"
            for key, num, den in (("forward", "forward_blocked", "forward_one_go"),
                                  ("train", "train_blocked", "train_one_go"),
                                  ("gemm_only", "gemm_only", "forward_one_go")):
                rows.append({"threads": threads, "mpo": name, "row": key, "blocked_s": t[num], "one_go_s": t[den],
                             "ratio": t[num] / t[den]})
            print(f"threads={threads} {name:>8}: forward blocked/one-go {t['forward_blocked'] / t['forward_one_go']:.2f}x"
                  f" | train blocked/one-go {t['train_blocked'] / t['train_one_go']:.2f}x"
                  f" | GEMM alone/one-go forward {t['gemm_only'] / t['forward_one_go']:.2f}x")
    torch.set_num_threads(threads_before)
    write_report(args.json, device="cpu", tokens=0, rows=rows, extra={"experts": E, "block_bytes": BLOCK_BYTES})


if __name__ == "__main__":
    main()
