"""The headline of the GPU check: tic_loss forward+backward at N=16384, V=151936 in bf16 (a
16k-token batch of a Qwen-size vocabulary), token and trajectory ratios, tic_kernels
(allocating and in place) next to Liger-Kernel's Triton GRPO loss when it imports, and the
targets: >= 0.90 of the copy bandwidth measured in the same run, >= 2x Liger, trajectory mode
within 1.05x of token mode. Writes OUT/headline.json (records, then one "targets" record).

    python benchmarks/headline.py --out OUT
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tic_loss  # noqa: E402
import harness  # noqa: E402

PROVIDERS = ["tic_kernels", "tic_kernels_inplace", "liger_grpo_token"]


def _p50(records, provider, mode, pass_="fwd+bwd"):
    for r in records:
        if (r["provider"], r.get("mode"), r["pass"], r["status"]) == (provider, mode, pass_, "ok"):
            return r["ms"]["p50"], r.get("copy_fraction")
    return None, None


def targets(records):
    """The issue's three targets, each with the measured figure and whether it is met (None
    when a figure is missing)."""
    tok, tok_frac = _p50(records, "tic_kernels", "token")
    traj, traj_frac = _p50(records, "tic_kernels", "trajectory")
    liger, _ = _p50(records, "liger_grpo_token", "token")
    fracs = [f for f in (tok_frac, traj_frac) if f is not None]
    out = {
        "copy_fraction_min": min(fracs) if fracs else None,
        "speedup_vs_liger_token": liger / tok if liger and tok else None,
        "trajectory_over_token": traj / tok if traj and tok else None,
    }
    out["meets_copy_fraction_0.90"] = None if not fracs else min(fracs) >= 0.90
    out["meets_2x_liger"] = None if out["speedup_vs_liger_token"] is None else \
        out["speedup_vs_liger_token"] >= 2.0
    out["meets_trajectory_1.05x"] = None if out["trajectory_over_token"] is None else \
        out["trajectory_over_token"] <= 1.05
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="16384x151936", help="NxV")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    p.add_argument("--reps", type=int, default=None, help="timed reps (default: the harness's)")
    args = p.parse_args(argv)
    save_as = (args.out, "headline")
    records = bench_tic_loss.run(args.device, harness.parse_shapes(args.shape),
                                 [getattr(torch, args.dtype)], ["token", "trajectory"],
                                 only=PROVIDERS, save_as=save_as, compiled=False,
                                 reps=args.reps)
    t = targets(records)
    records.append({"op": "targets", "provider": "tic_kernels", "pass": "fwd+bwd",
                    "status": "ok", **t})
    harness.save(records, *save_as)
    print("targets: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
