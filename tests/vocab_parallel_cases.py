"""The cases of tests/test_vocab_parallel.py, and the script each rank runs.

``run_cases`` computes every op of op 7 on this rank's vocabulary slice (the whole vocabulary
with world = 1 and no group), returning values and gradients; the test runs it in one process
for the unsharded result and in ``world`` spawned processes under a gloo group:

    python tests/vocab_parallel_cases.py RANK WORLD PORT SEED DEVICE OUT
"""
from __future__ import annotations

import sys

import torch

import tic_kernels as tk
from tic_kernels.ranks import exit_process_group
from tic_kernels.testing import head_batch, loss_batch, rollout_keywords

# Keys of the results that are gradients of the vocabulary-sharded inputs: the logits' last
# dimension, the head's first.
SHARDED_LAST = ("grad_logits",)
SHARDED_FIRST = ("grad_weight", "grad_bias")
V = 222  # 2 x 111, 3 x 74: shards that are not a multiple of any block
LENGTHS = [3, 0, 9, 1]  # an empty sequence, one token, one longer than a 4-row chunk
DTYPES = (torch.float32, torch.bfloat16)


def _cols(rank, world):
    size = V // world
    return slice(rank * size, (rank + 1) * size)


def _leaf(t, cols=None, last=True):
    t = t if cols is None else (t[..., cols] if last else t[cols])
    return t.detach().clone().requires_grad_(True)


def run_cases(seed, device, rank=0, world=1, group=None):
    """{case: {name: tensor}} for this rank; gradients of hidden summed over the group (the
    caller's reduction of a column-parallel head's input)."""
    cols = _cols(rank, world)
    out = {}
    for dt in DTYPES:
        name = str(dt).split(".")[-1]
        g = torch.Generator().manual_seed(seed)
        for padded in (False, True):
            lay = "padded" if padded else "packed"
            b = loss_batch(LENGTHS, V, dtype=dt, padded=padded, device=device,
                           seed=seed + padded)
            t = b.targets if not padded else torch.where(b.layout_kw["mask"], b.targets, -100)
            # op 1 with temperature, entropy and ignored rows; a random weighting of both
            z = _leaf(torch.nan_to_num(b.logits), cols)
            t1 = t.clone()
            t1.view(-1)[0] = -100
            lp, H = tk.token_logprobs(z, t1, temperature=0.7, return_entropy=True,
                                      process_group=group)
            gl = torch.randn(lp.shape, generator=g).to(device)
            gh = torch.randn(lp.shape, generator=g).to(device)
            (lp * gl + H * gh).sum().backward()
            out[f"token_logprobs/{name}/{lay}"] = dict(logp=lp, entropy=H, grad_logits=z.grad)
            # op 4 from the logits: every term (KL, entropy bonus, temperature, op 4b), and
            # the top-entropy selection of the whole vocabulary's entropies
            z = _leaf(b.logits, cols)
            o = tk.tic_loss(z, b.targets, b.old_logprobs, b.advantages, temperature=0.8,
                            ref_logprobs=b.ref_logprobs, beta=0.05, entropy_coef=0.01,
                            ratio="token" if padded else "trajectory", process_group=group,
                            top_entropy_quantile=0.6,
                            **b.layout_kw, **rollout_keywords(
                                b.old_logprobs, b.layout_kw,
                                "weights" if padded else "sequence_mask", seed=seed))
            o.loss.backward()
            out[f"tic_loss/{name}/{lay}"] = dict(loss=o.loss, grad_logits=z.grad, **o.stats)
            # op 6: the head's shard; chunks of 4 rows split the 9-token sequence
            hb = head_batch(LENGTHS, V, dtype=dt, padded=padded, device=device,
                            seed=seed + 2 + padded)
            th = hb.targets if not padded else torch.where(hb.layout_kw["mask"], hb.targets,
                                                           -100)
            h = _leaf(torch.nan_to_num(hb.hidden))
            w, bias = _leaf(hb.weight, cols, last=False), _leaf(hb.bias, cols, last=False)
            lp, H = tk.linear_token_logprobs(h, w, th, bias=bias, temperature=0.9,
                                             return_entropy=True, chunk_size=4,
                                             process_group=group)
            (lp * gl[..., :lp.shape[-1]] + H * gh[..., :lp.shape[-1]]).sum().backward()
            out[f"linear_token_logprobs/{name}/{lay}"] = dict(
                logp=lp, entropy=H, grad_hidden=_reduced(h.grad, group), grad_weight=w.grad,
                grad_bias=bias.grad)
            h = _leaf(hb.hidden)
            w, bias = _leaf(hb.weight, cols, last=False), _leaf(hb.bias, cols, last=False)
            # padded: KL-Cov, whose selection needs every row's log-prob before a gradient
            kl_cov = dict(ratio="token", objective="kl_cov", kl_cov_ratio=0.3) if padded else {}
            o = tk.linear_tic_loss(h, w, hb.targets, hb.old_logprobs, hb.advantages, bias=bias,
                                   chunk_size=4, ref_logprobs=hb.ref_logprobs, beta=0.05,
                                   entropy_coef=0.01, process_group=group, **hb.layout_kw,
                                   **kl_cov,
                                   **rollout_keywords(
                                       hb.old_logprobs, hb.layout_kw,
                                       "sequence_truncate" if padded else "token_truncate",
                                       seed=seed))
            o.loss.backward()
            out[f"linear_tic_loss/{name}/{lay}"] = dict(
                loss=o.loss, grad_hidden=_reduced(torch.nan_to_num(h.grad), group),
                grad_weight=w.grad, grad_bias=bias.grad, **o.stats)
    return {case: {k: v.detach().cpu() for k, v in d.items()} for case, d in out.items()}


def _reduced(grad, group):
    if group is None:
        return grad
    import torch.distributed as dist
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def main(rank, world, port, seed, device, path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.save(run_cases(seed, device, rank, world, dist.group.WORLD), path)
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_process_group()


if __name__ == "__main__":
    r, k, p, s = (int(a) for a in sys.argv[1:5])
    main(r, k, p, s, sys.argv[5], sys.argv[6])
