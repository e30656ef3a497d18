"""A thin TIC-GRPO trainer for Hugging Face causal LMs, built on tic_kernels.

    python -m tic_kernels.train                       # default: tiny Llama learns to count
    python -m tic_kernels.train --algo grpo --steps 200 --out runs/grpo
    python -m tic_kernels.train --model ./my-hf-model --task my_pkg.tasks:make_task
    python -m tic_kernels.train compare --seeds 3     # tic vs grpo vs gspo vs no_is
    torchrun --nproc-per-node 2 -m tic_kernels.train  # data parallel (gloo on CPU, nccl on GPU)

Each step: sample G completions for each of P prompts (temperature), score them, turn rewards
into group advantages, take the old log-probabilities under no_grad with the same kernels, then
mu optimisation steps of tic_loss on the loss tokens: packed with varlen attention on CUDA
(flash-attn when it imports, torch.nn.attention.varlen otherwise), padded sdpa on the CPU; only
the loss rows go through the LM head. Algorithms:
  tic    trajectory ratio exp(sum of token log-ratios), clip 0.2 / 0.28 (TIC-GRPO)
  grpo   token ratio, clip-higher 0.2 / 0.28, token-mean (GRPO / DAPO)
  gspo   length-normalised sequence ratio, clip 3e-4 / 4e-4 (GSPO)
  no_is  no importance sampling: the gradient of A * logp is taken once at the old policy and
         reused for the mu steps (the paper's simplified variant)
Logs one line per step and metrics.jsonl; checkpoints with save_pretrained (--resume).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import tic_kernels as tk
from tic_kernels.attention import attention, register_varlen_attention
from tic_kernels.packing import pack

ALGOS = {  # tic_loss keywords of each algorithm
    "tic": dict(ratio="trajectory", eps_low=0.2, eps_high=0.28),
    "grpo": dict(ratio="token", eps_low=0.2, eps_high=0.28),
    "gspo": dict(ratio="sequence_mean", eps_low=3e-4, eps_high=4e-4),
    "no_is": dict(ratio="none"),
}


# ------------------------------------------------------------------ the default task
class CountingTask:
    """Generated, exactly verifiable problems: the prompt is a digit d; the answer counts on,
    d+1, d+2, ... (mod 10), ``length`` digits, then EOS. Reward: the fraction of the answer's
    digits in the right place (and nothing after EOS). A random policy scores about 1/V."""

    def __init__(self, length=4, tokenizer=None):
        self.length = length
        self.max_new_tokens = length + 1
        if tokenizer is None:  # own vocabulary: 0-9, then BOS, '=', EOS, PAD
            self.digits = list(range(10))
            self.bos, self.eq, self.eos_id, self.pad_id = 10, 11, 12, 13
            self.vocab_size = 16
        else:
            def one(text):
                ids = tokenizer.encode(text, add_special_tokens=False)
                return ids[-1]
            self.digits = [one(str(d)) for d in range(10)]
            self.eq = one("=")
            self.eos_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
            self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eq
            self.vocab_size = len(tokenizer)

    def sample_prompts(self, n, generator):
        ds = torch.randint(0, 10, (n,), generator=generator).tolist()
        return [[self.bos, self.digits[d], self.eq] for d in ds]

    def reward(self, prompt, completion):
        d = self.digits.index(prompt[1])
        want = [self.digits[(d + k) % 10] for k in range(1, self.length + 1)] + [self.eos_id]
        got = completion[: len(want)]
        return sum(int(a == b) for a, b in zip(got, want)) / len(want)


def load_task(spec, tokenizer):
    if spec is None:
        return CountingTask(tokenizer=tokenizer)
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--task must look like 'package.module:factory', got {spec!r}")
    import importlib
    return getattr(importlib.import_module(module), attr)(tokenizer)


# ------------------------------------------------------------------ model
def build_model(args, task):
    if args.model:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                    attn_implementation="sdpa")
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=task.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      intermediate_size=2 * args.hidden, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, bos_token_id=task.bos, eos_token_id=task.eos_id,
                      pad_token_id=task.pad_id, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


class LossRowsLM(torch.nn.Module):
    """Logits of the loss rows only: the LM head runs on the rows that carry a loss.

    Packed: input_ids (1, N_all) with position_ids restarting per sequence and the varlen
    attention over ``cu_seq_lens_q``; padded: (B, T) with an attention mask and sdpa.
    ``rows`` index the flattened hidden states."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, rows, position_ids=None, attention_mask=None, **varlen):
        with attention(self.lm, "tic_varlen" if varlen else "sdpa"):
            hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=attention_mask, use_cache=False,
                                        **varlen).last_hidden_state
        # in the model's dtype: the kernels read bf16 logits (an fp32 copy would double them)
        return self.lm.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[rows])


# ------------------------------------------------------------------ rollouts
def _positions(attn):
    """Position ids that count only attended tokens (left padding starts at 0)."""
    return (attn.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(lm, task, prompts, group, temperature, generator):
    """G completions per prompt: (input_ids, attention_mask, completion_mask) (B, T) and the
    completions as lists. Prompts are left-padded; a completion ends at EOS."""
    device = next(lm.parameters()).device
    prompts = [p for p in prompts for _ in range(group)]
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), task.pad_id, dtype=torch.long)
    attn = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    comp = torch.zeros_like(attn)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(task.max_new_tokens):
        pos = _positions(attn)
        logits = lm(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits[:, -1]
        probs = torch.softmax(logits.float() / temperature, -1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        live = ~done
        ids = torch.cat([ids, torch.where(live, nxt, task.pad_id)[:, None]], 1)
        attn = torch.cat([attn, live.long()[:, None]], 1)
        comp = torch.cat([comp, live.long()[:, None]], 1)
        done |= nxt == task.eos_id
    completions = [row[c.bool()].tolist() for row, c in zip(ids.cpu(), comp.cpu())]
    return ids, attn, comp, prompts, completions


def loss_view(ids, attn, comp, layout):
    """The model inputs and tic_loss layout for either layout (same tokens, same order)."""
    if layout == "packed":
        b = pack(ids, attn, comp)
        inputs = dict(input_ids=b.input_ids[None], position_ids=b.position_ids[None], rows=b.loss_rows,
                      cu_seq_lens_q=b.cu_seqlens, cu_seq_lens_k=b.cu_seqlens,
                      max_length_q=b.max_seqlen, max_length_k=b.max_seqlen)
        return inputs, b.loss_targets, dict(cu_seqlens=b.loss_cu_seqlens)
    B, T = ids.shape
    rows = torch.arange(B * T, device=ids.device).view(B, T)[:, :-1].reshape(-1)
    pos = _positions(attn)
    inputs = dict(input_ids=ids, attention_mask=attn, position_ids=pos, rows=rows)
    return inputs, ids[:, 1:], dict(mask=comp[:, 1:].bool())


def _view_logits(logits, layout_kw):
    if "mask" in layout_kw:
        B, T1 = layout_kw["mask"].shape
        return logits.view(B, T1, -1)
    return logits


# ------------------------------------------------------------------ training
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
    with torch.no_grad():
        old = tk.token_logprobs(_view_logits(policy(**inputs), layout_kw), targets,
                                temperature=args.temperature)
    keywords = dict(ALGOS[args.algo], temperature=args.temperature, **layout_kw)
    for inner in range(args.mu):
        if args.algo == "no_is" and inner > 0:
            opt.step()  # the same gradient, taken once at the old policy
            continue
        opt.zero_grad(set_to_none=True)
        out = tk.tic_loss(_view_logits(policy(**inputs), layout_kw), targets, old, adv, **keywords)
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
            plot = _plot({args.algo: [log]}, out / "reward.png")
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


def _plot(runs, path):
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
    plot = _plot(runs, out / "compare.png")
    print(f"csv: {out / 'compare.csv'}" + (f"\nplot: {plot}" if plot else ""))
    return runs


# ------------------------------------------------------------------ command line
def parser():
    p = argparse.ArgumentParser(prog="python -m tic_kernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["train", "compare"], default="train")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", choices=sorted(ALGOS), default="tic")
    g.add_argument("--mu", type=int, default=2, help="optimisation steps per batch")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts", type=int, default=16, help="prompts per step (per rank)")
    g.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--task", default=None, help="'module:factory' called with the tokenizer "
                   "(None without --model); default: the built-in counting task")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local Hugging Face causal LM directory; "
                   "default: a tiny random-init Llama built from a config")
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--layout", choices=["auto", "packed", "padded"], default="auto",
                   help="packed sequences with varlen attention (auto on CUDA) or padded sdpa "
                   "(auto on CPU)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=400)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="runs/default")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint period; 0: at the end only")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    g.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("compare")
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--algos", default="tic,grpo,gspo,no_is")
    return p


def check_args(p, args):
    for name in ("mu", "prompts", "group", "steps", "hidden", "layers", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        p.error("--group must be >= 2: a group of one has advantage 0")
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
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        compare(args) if args.command == "compare" else run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
