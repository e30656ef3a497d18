"""``python -m tic_kernels.train compare``: every algorithm over several seeds, CSV + PNG."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .loop import run
from .plot import reward_plot


def compare(args):
    """All four algorithms over several seeds on the default task: CSV + PNG."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    rows = ["algo,seed,step,reward,loss,clip_fraction,seconds"]
    for algo in args.algos.split(","):
        for seed in range(args.seeds):
            run_args = argparse.Namespace(**{**vars(args), "algo": algo, "seed": seed,
                                             "out": str(out / f"{algo}_seed{seed}"),
                                             "quiet": True, "resume": False})
            t0 = time.perf_counter()
            log, _ = run(run_args)
            runs.setdefault(algo, []).append(log)
            rows += [f"{algo},{seed},{r['step']},{r['reward']:.4f},{r['loss']:.5f},"
                     f"{r['clip_fraction']:.4f},{r['seconds']:.3f}" for r in log]
            last = sum(r["reward"] for r in log[-10:]) / len(log[-10:])
            print(f"{algo:6s} seed {seed}: final reward (last 10 steps) {last:.3f} "
                  f"in {time.perf_counter() - t0:.0f}s", flush=True)
    (out / "compare.csv").write_text("\n".join(rows) + "\n")
    plot = reward_plot(runs, out / "compare.png")
    print(f"csv: {out / 'compare.csv'}" + (f"\nplot: {plot}" if plot else ""))
    return runs
