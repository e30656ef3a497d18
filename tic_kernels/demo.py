"""The loss on a generated batch through the public API: loss, statistics and time.

    python -m tic_kernels.demo [--tokens 4096] [--vocab 32000] [--seqs 16] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch

import tic_kernels as tk
from tic_kernels.backend import use_triton
from tic_kernels.testing import loss_batch, random_lengths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="about this many loss tokens in all")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--ratio", choices=["trajectory", "sequence_mean", "token", "none"], default="trajectory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    lengths = random_lengths(args.seqs, max(1, 2 * args.tokens // args.seqs), generator=g)
    batch = loss_batch(lengths, args.vocab, dtype=getattr(torch, args.dtype), device=args.device)
    adv = tk.group_advantages(torch.randn(args.seqs, generator=g).to(args.device), group_size=4)
    logits = batch.logits.requires_grad_(True)
    path = "triton" if use_triton(logits) else "reference"
    print(f"{int(lengths.sum())} tokens in {args.seqs} sequences, V={args.vocab}, {args.dtype}, "
          f"ratio={args.ratio}, device={args.device}, path={path}")

    for step in range(2):  # the first run includes compilation / warm-up
        t0 = time.perf_counter()
        out = tk.tic_loss(logits, batch.targets, batch.old_logprobs, adv, ratio=args.ratio,
                          **batch.layout_kw)
        out.loss.backward()
        if logits.is_cuda:
            torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        logits.grad = None
    print(f"loss {out.loss.item():+.6f}   forward+backward {ms:.1f} ms")
    for k, v in out.stats.items():
        print(f"  {k:15s} {v.item():.6g}")


if __name__ == "__main__":
    main()
