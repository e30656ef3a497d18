"""Benchmark of the per-token log-softmax gather (forward, backward, forward+backward).

Providers: tic_kernels.token_logprobs, the reference, TRL's selective_log_softmax, and
flash-attn's Triton cross_entropy (-loss = logp) when it loads. The gradient is that of
sum_t w_t logp_t with fixed random weights w. Byte model as for tic_loss: N V s forward,
2 N V s backward.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tic_kernels as tk  # noqa: E402
from tic_kernels import reference as ref  # noqa: E402

OP = "token_logprobs"


def providers(targets, w, device):
    out = {"tic_kernels": lambda x: (tk.token_logprobs(x, targets) * w).sum(),
           "reference": lambda x: (ref.token_logprobs(x, targets) * w).sum()}
    try:
        from trl.trainer.utils import selective_log_softmax
        out["trl_selective_log_softmax"] = lambda x: (selective_log_softmax(x, targets) * w).sum()
    except Exception:
        pass
    fa_logp = harness.flash_attn_logprobs() if torch.device(device).type == "cuda" else None
    if fa_logp is not None:
        out["flash_attn_ce"] = lambda x: (fa_logp(x, targets) * w).sum()
    return out


def run(device, shapes, dtypes, only=None, reps=None, save_as=None,
        passes=("fwd", "bwd", "fwd+bwd")):
    env = harness.environment(device)
    copy = harness.copy_bandwidth_gbps(device)
    records = []
    for N, V in shapes:
        for dtype in dtypes:
            batch = harness.make_batch(N, V, dtype, device)
            targets = batch["targets"]
            w = torch.randn(targets.shape, device=device)
            want = harness.loss_and_grad(lambda x: (ref.token_logprobs(x, targets) * w).sum(),
                                         batch["logits"])
            for name, fn in providers(targets, w, device).items():
                if only and name not in only:
                    continue
                recs = harness.bench_logits_provider(
                    OP, name, fn, batch["logits"], want, passes,
                    shape={"N": N, "V": V}, dtype=dtype, mode=None,
                    copy_gbps=copy, env=env, device=device, reps=reps)
                harness.print_table(recs)
                records += recs
                if save_as:  # keep what was measured if the run is cut short
                    harness.save(records, *save_as)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="16384x151936")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--providers", default=None)
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    recs = run(args.device, harness.parse_shapes(args.shapes),
               [getattr(torch, d) for d in args.dtypes.split(",")],
               only=args.providers.split(",") if args.providers else None)
    print("wrote", harness.save(recs, args.out, f"{OP}_{torch.device(args.device).type}"))


if __name__ == "__main__":
    main()
