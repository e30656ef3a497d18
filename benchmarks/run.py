"""Runs every benchmark and writes JSON under --out (default benchmarks/results/).

    python benchmarks/run.py --quick            # GPU: < 8 min with the build and CUDA tests
    python benchmarks/run.py                    # GPU: the full grid
    python benchmarks/run.py --device cpu       # CPU: the reference and fallback costs

Full grid (GPU): N in {4096, 16384, 32768} x V in {32000, 128256, 151936}, bf16 and fp32,
ratio modes token and trajectory (and sequence_mean, Liger's sequence level). On the CPU only
the reference path against TRL's selective_log_softmax path, and the packing extension
against its PyTorch fallback, are timed: the Triton kernels there are the interpreter.
The fused LM head (bench_linear.py) runs at 16384 x 4096 x 151936 bf16 on a GPU and at
4096 x 256 x 32000 fp32 on the CPU (--no-linear leaves it out: the GPU check runs it on its
own). Then
``python benchmarks/report.py`` makes the plots and the README table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_linear  # noqa: E402
import bench_packing  # noqa: E402
import bench_tic_loss  # noqa: E402
import bench_token_logprobs  # noqa: E402
import harness  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    p.add_argument("--shapes", default=None, help="NxV,... instead of the grid's")
    p.add_argument("--dtypes", default=None, help="instead of the grid's, e.g. bfloat16")
    p.add_argument("--packing", default="64x4096", help="BxT of the packing benchmark")
    p.add_argument("--no-linear", action="store_true",
                   help="leave the fused LM head out (the GPU check runs it on its own)")
    p.add_argument("--linear", default=None, help="NxHxV of the fused LM head's benchmark "
                   "(default: 16384x4096x151936 on a GPU, 4096x256x32000 on the CPU)")
    args = p.parse_args(argv)
    dev = torch.device(args.device).type
    bf16, fp32 = torch.bfloat16, torch.float32
    if dev == "cuda" and args.quick:
        # trajectory+sampler: the cost of op 4b (the sampler correction) next to trajectory
        shapes, dtypes, modes = [(16384, 151936)], [bf16], ["token", "trajectory",
                                                            "trajectory+sampler"]
        only = None
    elif dev == "cuda":
        shapes = [(n, v) for n in (4096, 16384, 32768) for v in (32000, 128256, 151936)]
        dtypes, modes, only = [bf16, fp32], ["token", "trajectory", "sequence_mean"], None
    else:
        shapes = [(2048, 32000)] if args.quick else [(2048, 32000), (4096, 151936)]
        dtypes, modes = [fp32, bf16], ["token", "trajectory"]
        only = ["reference", "trl_selective_log_softmax+torch", "trl_selective_log_softmax"]
    if args.shapes:
        shapes = harness.parse_shapes(args.shapes)
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    tag = f"{dev}{'_quick' if args.quick else ''}"
    # packing first: it is quick, and the JSON files are rewritten as results come in
    recs = bench_packing.run(args.device, harness.parse_shapes(args.packing))
    print("wrote", harness.save(recs, args.out, f"packing_{tag}"))
    recs = bench_tic_loss.run(args.device, shapes, dtypes, modes, only=only,
                              save_as=(args.out, f"tic_loss_{tag}"), compiled=not args.quick)
    print("wrote", harness.save(recs, args.out, f"tic_loss_{tag}"))
    recs = bench_token_logprobs.run(args.device, shapes, dtypes, only=only,
                                    save_as=(args.out, f"token_logprobs_{tag}"))
    print("wrote", harness.save(recs, args.out, f"token_logprobs_{tag}"))
    # the fused LM head: on a GPU at the headline shape, on the CPU at a CPU-sized one with
    # 1024-row chunks (its chunked reference path)
    if not args.no_linear:
        dt, chunk = (fp32, 1024) if dev == "cpu" else (bf16, None)
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in (
            args.linear or ("4096x256x32000" if dev == "cpu" else "16384x4096x151936")
        ).split(",")]
        recs = bench_linear.run(args.device, shapes, dt, ["trajectory", "token"],
                                chunk_size=chunk, save_as=(args.out, f"linear_{tag}"))
        print("wrote", harness.save(recs, args.out, f"linear_{tag}"))


if __name__ == "__main__":
    main()
