"""The command line of ``python -m tic_kernels.train``: flags, their checks, dispatch."""
from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import torch
import torch.distributed as dist

from ..ranks import exit_process_group
from .compare import compare
from .loop import ALGOS, run
from .tasks import TASKS


def parser():
    usage = importlib.import_module(__package__).__doc__  # the package's docstring
    p = argparse.ArgumentParser(prog="python -m tic_kernels.train", description=usage,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["train", "compare"], default="train")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", choices=sorted(ALGOS), default="tic",
                   help="tic: the paper's TIC-GRPO (trajectory ratio, upper-only clip, "
                   "length-corrected advantages); tic-two-sided and tic-no-length-norm each "
                   "switch one ingredient off")
    g.add_argument("--clip", choices=["two_sided", "upper"], default=None,
                   help="clip_mode (default: the algorithm's)")
    g.add_argument("--eps-low", type=float, default=None, help="default: the algorithm's")
    g.add_argument("--eps-high", type=float, default=None, help="default: the algorithm's")
    g.add_argument("--length-normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="length-corrected group advantages, r_i / L_i (default: the "
                   "algorithm's: on for tic)")
    g.add_argument("--mu", type=int, default=2, help="optimisation steps per batch")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts", type=int, default=16, help="prompts per step (per rank)")
    g.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--task", default=None, help="a built-in task (" + ", ".join(TASKS) +
                   ") or 'module:factory' called with the tokenizer (None without --model); "
                   "default: counting")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local Hugging Face causal LM directory; "
                   "default: a tiny random-init Llama built from a config")
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--layout", choices=["auto", "packed", "padded"], default="auto",
                   help="packed sequences with varlen attention (auto on CUDA) or padded sdpa "
                   "(auto on CPU)")
    g.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="autocast the model's forward passes (bf16: the varlen flash kernels "
                   "on CUDA take the packed layout's attention)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (fully_shard) instead of "
                   "DDP's replicas")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=400)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="runs/default")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint period; 0: at the end only")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("compare")
    g.add_argument("--seeds", type=int, default=5)
    g.add_argument("--algos", default="tic,grpo,gspo,no_is,tic-two-sided,tic-no-length-norm")
    g.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    g.add_argument("--threshold", type=float, default=0.6,
                   help="the reward whose first crossing (10-step mean) the summary reports")
    return p


def check_args(p, args):
    for name in ("mu", "prompts", "group", "steps", "hidden", "layers", "seeds", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error("--group must be >= 2: a group of one has advantage 0")
    for name in ("eps_low", "eps_high"):
        value = getattr(args, name)
        if value is not None and not (0 <= value < 1e6 and math.isfinite(value)):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    for name in ("lr", "temperature"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name} must be a finite number > 0, got {getattr(args, name)}")
    if args.grad_clip < 0 or args.save_every < 0:
        p.error("--grad-clip and --save-every must be >= 0")
    if args.hidden % 4:
        p.error(f"--hidden must be a multiple of 4 (the attention heads), got {args.hidden}")
    bad = set(args.algos.split(",")) - set(ALGOS)
    if bad:
        p.error(f"--algos: unknown {sorted(bad)}; choose from {sorted(ALGOS)}")
    if args.model and not Path(args.model).is_dir():
        p.error(f"--model must be a local directory, {args.model!r} is not")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")


def main(argv=None):
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("the trainer needs transformers: pip install 'tic_kernels[train]'")
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        compare(args) if args.command == "compare" else run(args)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():  # a distributed run: leave without gloo's teardown race
        exit_process_group()

