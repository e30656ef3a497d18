"""The reward curve of one or several runs (matplotlib, optional)."""
from __future__ import annotations

import torch


def reward_plot(runs, path):
    """Mean reward per step (band: min..max over seeds) per algorithm; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, logs in runs.items():
        steps = min(len(lg) for lg in logs)
        r = torch.tensor([[rec["reward"] for rec in lg[:steps]] for lg in logs])
        x = range(1, steps + 1)
        ax.plot(x, r.mean(0), label=f"{algo} ({len(logs)} seed{'s' if len(logs) > 1 else ''})")
        if len(logs) > 1:
            ax.fill_between(x, r.min(0).values, r.max(0).values, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
