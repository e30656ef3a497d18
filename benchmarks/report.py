"""Plots (one PNG per op) and the results table of benchmarks/README.md, from
benchmarks/results/*.json.

    python benchmarks/report.py [--results benchmarks/results] [--readme benchmarks/README.md]

The table goes between the README's "<!-- results:start -->" and "<!-- results:end -->"
markers; each section names its device and date, as recorded in the JSON.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
NOT_ROWS = ("copy", "targets")  # the measured copy bandwidth, the targets' verdicts


def load(results):
    recs = []
    for path in sorted(Path(results).glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, list):  # not a benchmark's records (host_time.py's summary)
            continue
        for r in data:
            r["file"] = path.stem
            recs.append(r)
    return recs


def _label(r):
    shape = "x".join(str(v) for v in r["shape"].values())
    return f"{shape} {r['dtype']}" + (f" {r['mode']}" if r.get("mode") else "")


def table(recs):
    lines = []
    by_file = defaultdict(list)
    for r in recs:
        if r["op"] not in NOT_ROWS:
            by_file[r["file"]].append(r)
    copies = {r["file"]: r for r in recs if r["op"] == "copy"}
    goals = {r["file"]: r for r in recs if r["op"] == "targets"}
    for f, rows in by_file.items():
        ok = [r for r in rows if r["status"] == "ok"]
        first = ok[0] if ok else rows[0]
        copy = copies.get(f, {}).get("gbps")
        lines.append(f"\n**{f}** on {first.get('device')} ({first.get('date')}, commit "
                     f"{first.get('git_commit')}, torch {first.get('torch')}"
                     + (f", measured copy {copy:.0f} GB/s" if copy else "") + ")\n")
        lines.append("| op | shape | provider | pass | ms (p50) | GB/s | % of copy | peak MiB "
                     "| d weight err vs fp64 |")
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            head = f"| {r['op']} | {_label(r)} | {r['provider']} | {r['pass']} | "
            if r["status"] != "ok":  # say why: the check's numbers or the error
                why = r.get("error", "").replace("|", "/")[:90]
                lines.append(head + f"{r['status']}: {why} | | | | |")
                continue
            err = f"{r['dw_err64']:.3g}" if "dw_err64" in r else ""
            if "ms" not in r:  # an accuracy-only record
                lines.append(head + f"(not timed) | | | | {err} |")
                continue
            frac = r.get("copy_fraction")
            gbps = f"{r.get('gbps', 0):.1f} | {100 * frac:.1f}" if frac is not None else " | "
            lines.append(head + f"{r['ms']['p50']:.3f} | {gbps} | {r.get('peak_mib', 0):.0f} | "
                         f"{err} |")
        if f in goals:  # headline.py's verdict on the targets
            lines.append("\ntargets: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in goals[f].items() if k.startswith(("meets", "copy_", "speedup",
                                                               "trajectory_", "time_", "extra",
                                                               "unfused_"))))
    return "\n".join(lines)


def plot(recs, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_file = defaultdict(list)
    for r in recs:
        if r["op"] not in NOT_ROWS and r["status"] == "ok" and "ms" in r:
            by_file[r["file"]].append(r)
    paths = []
    for f, rows in by_file.items():
        main_pass = "fwd+bwd" if any(r["pass"] == "fwd+bwd" for r in rows) else rows[0]["pass"]
        rows = [r for r in rows if r["pass"] == main_pass]
        groups = sorted({_label(r) for r in rows})
        provs = sorted({r["provider"] for r in rows})
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(provs)) / 3), 4))
        width = 0.8 / max(len(provs), 1)
        for i, p in enumerate(provs):
            vals = [next((r["ms"]["p50"] for r in rows if r["provider"] == p and _label(r) == g),
                         0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=15,
                      fontsize=8)
        ax.set_ylabel(f"{main_pass} ms (p50, lower is better)")
        ax.set_title(f"{f} on {rows[0].get('device')}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{f}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--readme", default=str(ROOT / "benchmarks" / "README.md"))
    args = p.parse_args(argv)
    recs = load(args.results)
    for path in plot(recs, args.results):
        print("plot:", path)
    readme = Path(args.readme)
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(head + START + "\n" + table(recs) + "\n" + END + tail)
        print("updated the results table in", readme)


if __name__ == "__main__":
    main()
