"""``python -m tic_kernels.train compare``: algorithms over several seeds on one task: a CSV of
every step, a PNG of the reward (band: the seeds' min..max) and a summary table."""
from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .plot import reward_plot


def _one(run_args):
    """One run (in a worker process when --jobs > 1): its log and its wall time."""
    import torch

    from .loop import run
    if run_args.jobs > 1:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    log, _ = run(run_args)
    return log, time.perf_counter() - t0


def steps_to(log, threshold, window=10):
    """The first step whose trailing ``window``-step mean reward reaches ``threshold``
    (None if none does)."""
    rewards = [r["reward"] for r in log]
    for i in range(window, len(rewards) + 1):
        if sum(rewards[i - window:i]) / window >= threshold:
            return i
    return None


def _spread(xs):
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd


def summary(runs, threshold, last=20):
    """A markdown table per algorithm: the final reward (mean of the last ``last`` steps) as
    mean +- sample std over seeds with min..max, its difference from the first algorithm's
    with Welch's t statistic, and the steps to reach ``threshold``."""
    first = None
    rows = [f"| algo | seeds | final reward (last {last} steps), mean +- sd | min..max | "
            f"vs {next(iter(runs))}: difference (Welch t) | "
            f"steps to a 10-step mean >= {threshold} (median; seeds reaching it) |",
            "|---|---:|---:|---:|---:|---:|"]
    for algo, logs in runs.items():
        finals = [sum(r["reward"] for r in lg[-last:]) / len(lg[-last:]) for lg in logs]
        mean, sd = _spread(finals)
        if first is None:
            first, versus = (mean, sd, len(finals)), "-"
        else:
            se = math.sqrt(sd ** 2 / len(finals) + first[1] ** 2 / first[2])
            versus = f"{mean - first[0]:+.3f} ({(mean - first[0]) / se:+.1f})" if se > 0 \
                else f"{mean - first[0]:+.3f}"
        hit = sorted(s for s in (steps_to(lg, threshold) for lg in logs) if s is not None)
        med = "never" if not hit else format(hit[len(hit) // 2] if len(hit) % 2
                                             else (hit[len(hit) // 2 - 1] + hit[len(hit) // 2]) / 2, "g")
        rows.append(f"| {algo} | {len(logs)} | {mean:.3f} +- {sd:.3f} | {min(finals):.3f}.."
                    f"{max(finals):.3f} | {versus} | {med}; {len(hit)}/{len(logs)} |")
    return "\n".join(rows) + "\n"


def runs_from_csv(path):
    """{algo: [log of each seed]} back from compare's CSV (each log a list of step dicts)."""
    runs = {}
    lines = Path(path).read_text().splitlines()
    keys = lines[0].split(",")
    for line in lines[1:]:
        rec = dict(zip(keys, line.split(",")))
        seeds = runs.setdefault(rec["algo"], {})
        seeds.setdefault(rec["seed"], []).append({k: float(v) for k, v in rec.items()
                                                  if k not in ("algo", "seed")})
    return {algo: list(seeds.values()) for algo, seeds in runs.items()}


def compare(args):
    """Every algorithm of --algos over --seeds seeds (--jobs at once): OUT/compare.csv,
    compare.png, summary.md, and each run's own directory under OUT/runs."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(algo, seed) for algo in args.algos.split(",") for seed in range(args.seeds)]
    all_args = [argparse.Namespace(**{**vars(args), "algo": algo, "seed": seed,
                                      "out": str(out / "runs" / f"{algo}_seed{seed}"),
                                      "quiet": True, "resume": False, "save_every": 0})
                for algo, seed in plan]
    if args.jobs > 1:
        import multiprocessing
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_one, all_args))
    else:
        results = [_one(a) for a in all_args]
    runs = {}
    rows = ["algo,seed,step,reward,loss,clip_fraction,ratio_mean,seconds"]
    for (algo, seed), (log, secs) in zip(plan, results):
        runs.setdefault(algo, []).append(log)
        rows += [f"{algo},{seed},{r['step']},{r['reward']:.4f},{r['loss']:.5f},"
                 f"{r['clip_fraction']:.4f},{r['ratio_mean']:.4f},{r['seconds']:.3f}"
                 for r in log]
        final = sum(r["reward"] for r in log[-20:]) / len(log[-20:])
        print(f"{algo:18s} seed {seed}: final reward (last 20 steps) {final:.3f} in {secs:.0f}s",
              flush=True)
    (out / "compare.csv").write_text("\n".join(rows) + "\n")
    table = summary(runs, args.threshold)
    (out / "summary.md").write_text(table)
    print(table)
    plot = reward_plot(runs, out / "compare.png")
    print(f"csv: {out / 'compare.csv'}" + (f"\nplot: {plot}" if plot else ""))
    return runs
