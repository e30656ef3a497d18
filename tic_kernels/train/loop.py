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
from tic_kernels.train.attention import register_varlen_attention
from tic_kernels.layout import ignoring_masked

from . import checkpoint
from .model import LossRowsLM, build_model, shard
from .plot import reward_plot
from .rollout import loss_view, sample, view_rows
from .tasks import load_task

# Each algorithm: its tic_loss keywords, and whether the group advantages are length-corrected
# (group_advantages(..., lengths=L, length_normalize=True)). "tic" is the paper's TIC-GRPO
# (trajectory ratio, upper-only clip, length-corrected normalisation); the two "tic-" entries
# each switch one of its ingredients off (the ablations of `compare`).
ALGOS = {
    "tic": dict(ratio="trajectory", clip_mode="upper", eps_low=0.2, eps_high=0.28,
                length_normalize=True),
    "tic-two-sided": dict(ratio="trajectory", clip_mode="two_sided", eps_low=0.2,
                          eps_high=0.28, length_normalize=True),
    "tic-no-length-norm": dict(ratio="trajectory", clip_mode="upper", eps_low=0.2,
                               eps_high=0.28, length_normalize=False),
    "grpo": dict(ratio="token", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                 length_normalize=False),
    "gspo": dict(ratio="sequence_mean", clip_mode="two_sided", eps_low=3e-4, eps_high=4e-4,
                 length_normalize=False),
    "no_is": dict(ratio="none", length_normalize=False),
}


def resolved(args):
    """(tic_loss keywords, length_normalize) of ``args.algo`` with the ablation flags
    (--clip, --eps-low, --eps-high, --length-normalize) applied where given."""
    keywords = dict(ALGOS[args.algo])
    length_normalize = keywords.pop("length_normalize")
    if keywords["ratio"] != "none":
        for flag, key in (("clip", "clip_mode"), ("eps_low", "eps_low"),
                          ("eps_high", "eps_high")):
            if getattr(args, flag, None) is not None:
                keywords[key] = getattr(args, flag)
    if getattr(args, "length_normalize", None) is not None:
        length_normalize = args.length_normalize
    return keywords, length_normalize


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
    loss_keywords: dict  # the resolved tic_loss keywords, and length_normalize


def train_step(policy, lm, opt, task, args, generator, world):
    t0 = time.perf_counter()
    prompts = task.sample_prompts(args.prompts, generator)
    # DDP's replicas sample on their own (its forward would broadcast buffers at every token);
    # FSDP2 gathers the sharded parameters in the policy's forward
    sampler = policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) \
        else policy
    ids, attn, comp, flat_prompts, completions = sample(sampler, task, prompts, args.group,
                                                        args.temperature, generator)
    rewards = torch.tensor([task.reward(p, c) for p, c in zip(flat_prompts, completions)],
                           device=ids.device)
    loss_keywords, length_normalize = resolved(args)
    adv = tk.group_advantages(rewards, args.group, lengths=comp.sum(1),
                              length_normalize=length_normalize)
    inputs, targets, layout_kw = loss_view(ids, attn, comp, args.layout)
    # --amp bf16: the model's forward and the LM head in bf16 (then the packed layout's
    # attention runs the varlen flash kernels on CUDA); the weights stay fp32
    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    with torch.no_grad(), amp:
        old = policy(**inputs, head_fn=lambda hidden, weight, bias: tk.linear_token_logprobs(
            view_rows(hidden, layout_kw), weight, ignoring_masked(targets, layout_kw.get("mask")),
            bias=bias, temperature=args.temperature))
    keywords = dict(loss_keywords, temperature=args.temperature, **layout_kw)
    for inner in range(args.mu):
        if args.algo == "no_is" and inner > 0:
            opt.step()  # the same gradient, taken once at the old policy
            continue
        opt.zero_grad(set_to_none=True)
        with amp:
            out = policy(**inputs, head_fn=lambda hidden, weight, bias: tk.linear_tic_loss(
                view_rows(hidden, layout_kw), weight, targets, old, adv, bias=bias, **keywords))
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
                   stats["delta_abs_mean"].item(), world * n_tokens / secs, secs,
                   dict(loss_keywords, length_normalize=length_normalize))


def _full_state(lm, opt, fsdp):
    """The model's and the optimizer's full state dicts (under FSDP2 gathered to rank 0 on the
    CPU, a collective: every rank calls it; the other ranks get empty dicts)."""
    if not fsdp:
        return lm.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(lm, options=options),
            get_optimizer_state_dict(lm, opt, options=options))


def _load_optimizer(lm, opt, state, fsdp):
    if not fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(lm, opt, state, options=StateDictOptions(full_state_dict=True))


def _gathered(obj, world):
    """[obj of rank 0, obj of rank 1, ...] (a collective when world > 1)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _save(out, lm, opt, step, generator, log, rank, world, fsdp):
    """save_pretrained of the full state dict and the trainer's state, written by rank 0 (see
    checkpoint.write: a crash leaves the previous checkpoint or this one whole); every rank
    calls it (the per-rank random states are gathered, FSDP2's shards too)."""
    model_state, opt_state = _full_state(lm, opt, fsdp)
    rng = _gathered((generator.get_state(), torch.get_rng_state()), world)
    if rank != 0:
        return
    checkpoint.write(out, lambda path: lm.save_pretrained(path, state_dict=model_state),
                     {"step": step, "optimizer": opt_state, "generators": [g for g, _ in rng],
                      "torch_rngs": [t for _, t in rng], "python_rng": random.getstate(),
                      "log": log, "world": world})


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
    ckpt = Path(args.out) / checkpoint.NAME
    state = None
    if args.resume:
        found = checkpoint.latest(args.out)
        if found is None:
            raise SystemExit(f"--resume: no checkpoint under {ckpt}")
        state = checkpoint.load_state(found)
        lm = type(lm).from_pretrained(found, local_files_only=True, attn_implementation="sdpa")
    lm.to(device)
    register_varlen_attention()
    if args.layout == "auto":
        args.layout = "packed" if device.type == "cuda" else "padded"
    policy = LossRowsLM(lm)
    if world > 1:
        policy = shard(policy, "fsdp" if args.fsdp else "ddp")
    opt = torch.optim.Adam(lm.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    log, start = [], 0
    fsdp = world > 1 and args.fsdp
    if state is not None:
        if state.get("world", 1) != world:
            raise SystemExit(f"--resume: the checkpoint was written by {state.get('world', 1)} "
                             f"processes, this run has {world}")
        _load_optimizer(lm, opt, state["optimizer"], fsdp)
        if "generators" in state:
            generator.set_state(state["generators"][rank])
            torch.set_rng_state(state["torch_rngs"][rank])
        else:  # a checkpoint written before the per-rank random states (one process)
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
            _save(out, lm, opt, rec.step, generator, log, rank, world, fsdp)
    _save(out, lm, opt, args.steps, generator, log, rank, world, fsdp)
    if rank == 0:
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
