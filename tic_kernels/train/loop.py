"""The training loop, top to bottom: one step samples, scores, takes the old log-probabilities
and runs mu optimisation steps of the loss, both through the fused LM head (the logits are
never held whole); ``run`` builds everything and steps, logs and
checkpoints."""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import tic_kernels as tk
from tic_kernels.attention import register_varlen_attention
from tic_kernels.reference import ignoring_masked

from .model import LossRowsLM, build_model
from .plot import reward_plot
from .rollout import loss_view, sample, view_rows
from .tasks import load_task

ALGOS = {  # tic_loss keywords of each algorithm
    "tic": dict(ratio="trajectory", eps_low=0.2, eps_high=0.28),
    "grpo": dict(ratio="token", eps_low=0.2, eps_high=0.28),
    "gspo": dict(ratio="sequence_mean", eps_low=3e-4, eps_high=4e-4),
    "no_is": dict(ratio="none"),
}


@dataclass
class StepLog:
    step: int
    reward: float
    loss: float
    clip_fraction: float
    ratio_mean: float
    ratio_max: float
    delta_abs_mean: float
    tokens_per_s: float
    seconds: float


def train_step(policy, lm, opt, task, args, generator, world):
    t0 = time.perf_counter()
    prompts = task.sample_prompts(args.prompts, generator)
    ids, attn, comp, flat_prompts, completions = sample(lm, task, prompts, args.group,
                                                        args.temperature, generator)
    rewards = torch.tensor([task.reward(p, c) for p, c in zip(flat_prompts, completions)],
                           device=ids.device)
    adv = tk.group_advantages(rewards, args.group)
    inputs, targets, layout_kw = loss_view(ids, attn, comp, args.layout)
    # --amp bf16: the model's forward and the LM head in bf16 (then the packed layout's
    # attention runs the varlen flash kernels on CUDA); the weights stay fp32
    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    weight, bias = policy.module.head() if world > 1 else policy.head()
    with torch.no_grad(), amp:
        hidden = view_rows(policy(**inputs), layout_kw)
        old = tk.linear_token_logprobs(hidden, weight,
                                       ignoring_masked(targets, layout_kw.get("mask")),
                                       bias=bias, temperature=args.temperature)
    keywords = dict(ALGOS[args.algo], temperature=args.temperature, **layout_kw)
    for inner in range(args.mu):
        if args.algo == "no_is" and inner > 0:
            opt.step()  # the same gradient, taken once at the old policy
            continue
        opt.zero_grad(set_to_none=True)
        with amp:
            hidden = view_rows(policy(**inputs), layout_kw)
            out = tk.linear_tic_loss(hidden, weight, targets, old, adv, bias=bias, **keywords)
        out.loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), args.grad_clip)
        opt.step()
    # the last inner step's statistics: at the first one the policy is the old one (ratio 1)
    n_tokens = int(attn.sum())
    stats = {k: v.detach() for k, v in out.stats.items()}
    mean_reward = rewards.mean()
    if world > 1:
        for t in [mean_reward, *stats.values()]:
            dist.all_reduce(t)
            t /= world
    secs = time.perf_counter() - t0
    return StepLog(0, mean_reward.item(), out.loss.item(), stats["clip_fraction"].item(),
                   stats["ratio_mean"].item(), stats["ratio_max"].item(),
                   stats["delta_abs_mean"].item(), world * n_tokens / secs, secs)


def _save(out, lm, opt, step, generator, log):
    ckpt = Path(out) / "checkpoint"
    lm.save_pretrained(ckpt)
    torch.save({"step": step, "optimizer": opt.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "log": log},
               ckpt / "trainer_state.pt")


def run(args):
    """Trains as ``args`` says; returns (list of StepLog dicts, the model)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    task = load_task(args.task, tokenizer)
    random.seed(args.seed)
    lm = build_model(args, task)
    ckpt = Path(args.out) / "checkpoint"
    state = None
    if args.resume:
        if not (ckpt / "trainer_state.pt").exists():
            raise SystemExit(f"--resume: no checkpoint under {ckpt}")
        lm = type(lm).from_pretrained(ckpt, local_files_only=True, attn_implementation="sdpa")
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    lm.to(device)
    register_varlen_attention()
    if args.layout == "auto":
        args.layout = "packed" if device.type == "cuda" else "padded"
    policy = LossRowsLM(lm)
    if world > 1:
        policy = torch.nn.parallel.DistributedDataParallel(policy)
    opt = torch.optim.Adam(lm.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    log, start = [], 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log, start = state["log"], state["step"]
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "a" if args.resume else "w") if rank == 0 else None
    bar = _progress(range(start, args.steps), rank == 0 and not args.quiet)
    for step in bar:
        rec = train_step(policy, lm, opt, task, args, generator, world)
        rec.step = step + 1
        log.append(asdict(rec))
        if rank == 0:
            metrics.write(json.dumps(asdict(rec)) + "\n")
            metrics.flush()
            if not args.quiet:
                bar.write(f"step {rec.step:4d}  reward {rec.reward:.3f}  loss {rec.loss:+.4f}  "
                          f"clip {rec.clip_fraction:.3f}  ratio {rec.ratio_mean:.3f}/{rec.ratio_max:.3f}"
                          f"  |Delta| {rec.delta_abs_mean:.3f}  {rec.tokens_per_s:,.0f} tok/s")
            if args.save_every and rec.step % args.save_every == 0:
                _save(out, lm, opt, rec.step, generator, log)
    if rank == 0:
        _save(out, lm, opt, args.steps, generator, log)
        metrics.close()
        if not args.quiet:
            plot = reward_plot({args.algo: [log]}, out / "reward.png")
            print(f"log: {out / 'metrics.jsonl'}\ncheckpoint: {ckpt}" + (f"\nplot: {plot}" if plot else ""))
    return log, lm


def _progress(it, enabled):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(it, desc="train", dynamic_ncols=True)
        except ImportError:
            pass

    class _Plain(list):
        @staticmethod
        def write(msg):
            print(msg, flush=True)
    return _Plain(it)
