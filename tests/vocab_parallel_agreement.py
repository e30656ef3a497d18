"""The script each rank runs for tests/test_vocab_parallel.py's agreement and unowned-target
test (2 gloo processes): python tests/vocab_parallel_agreement.py RANK WORLD PORT

First the "disagree" cases: calls in which the ranks' inputs differ in something that shapes
a collective (or any other replicated input), one after another in the same group; each must
raise a ValueError on every rank, and the group must stay usable. Then the "unowned" ones:
with the value checks off, a target that no rank holds gives NaN in every op that takes a
group. Prints "cases: <which>" before each list, one tab-separated line per call (case,
exception name, message; or case, OK, values), and last an agreed call's line.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import tic_kernels as tk
from tic_kernels.ranks import exit_process_group

V_LOCAL, H, N = 23, 8, 6


def _inputs(rank, seed=0):
    """Replicated inputs from one seed; the vocabulary shard from the rank's own."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 2 * V_LOCAL, (N,), generator=g)
    old = torch.randn(N, generator=g) - 3.0
    adv = torch.randn(2, generator=g)
    hidden = torch.randn(N, H, generator=g)
    mask = torch.ones(2, N // 2, dtype=torch.bool)
    mask[1, -1] = False
    g_rank = torch.Generator().manual_seed(100 + rank)
    logits = torch.randn(N, V_LOCAL, generator=g_rank)
    weight = torch.randn(V_LOCAL, H, generator=g_rank)
    return t, old, adv, hidden, mask, logits, weight


def _disagreements(rank, group, path="kernels"):
    t, old, adv, hidden, mask, logits, weight = _inputs(rank)
    cu = torch.tensor([0, 2, N])
    other = rank == 1
    yield "return_entropy", lambda: tk.token_logprobs(logits, t, return_entropy=(rank == 0),
                                                      process_group=group)
    yield "temperature", lambda: tk.token_logprobs(logits, t, temperature=1.0 + 0.5 * other,
                                                   process_group=group)
    yield "targets", lambda: tk.token_logprobs(logits, (t + other) % (2 * V_LOCAL),
                                               process_group=group)
    yield "logits' dtype", lambda: tk.tic_loss(
        logits.to(torch.bfloat16 if other else torch.float32), t, old, adv, cu_seqlens=cu,
        process_group=group)
    yield "cu_seqlens", lambda: tk.tic_loss(logits, t, old, adv, cu_seqlens=cu + other * (
        torch.arange(3) == 1), process_group=group)
    yield "entropy_coef", lambda: tk.tic_loss(logits, t, old, adv, cu_seqlens=cu,
                                              entropy_coef=0.01 * other, process_group=group)
    yield "advantages", lambda: tk.tic_loss(logits, t, old, adv + other, cu_seqlens=cu,
                                            process_group=group)
    yield "chunk_size", lambda: tk.linear_tic_loss(
        hidden, weight, t, old, adv, cu_seqlens=cu, chunk_size=2 + other, process_group=group)
    flipped = mask.clone()
    flipped[1, -1] = other
    yield "mask", lambda: tk.linear_tic_loss(
        hidden.view(2, N // 2, H), weight, t.view(2, -1), old.view(2, -1), adv, mask=flipped,
        chunk_size=2, process_group=group)
    yield "entropy_coef", lambda: tk.linear_tic_loss(
        hidden, weight, t, old, adv, cu_seqlens=cu, entropy_coef=0.01 * other,
        process_group=group)
    yield "return_entropy", lambda: tk.linear_token_logprobs(
        hidden, weight, t, return_entropy=(rank == 0), chunk_size=2, process_group=group)
    # x and -nextafter(x): the bit patterns of the two differ by 2^31 - 1 (see the fingerprint)
    near = old.clone()
    near[1] = -torch.nextafter(old[1].abs(), torch.tensor(float("inf"))) if other else old[1].abs()
    yield "old_logprobs", lambda: tk.tic_loss(logits, t, near, adv, cu_seqlens=cu,
                                              process_group=group)
    if path == "kernels":
        yield "the implementation", lambda: _on_path("reference" if other else "kernels", lambda: (
            tk.linear_token_logprobs(hidden, weight, t, chunk_size=2, process_group=group)))
    yield "different sets of arguments", lambda: tk.tic_loss(
        logits, t, old, adv, cu_seqlens=cu, process_group=group,
        **(dict(rollout_weights=torch.ones(N)) if other else {}))
    yield "different functions", lambda: (
        tk.token_logprobs(logits, t, process_group=group) if rank == 0 else
        tk.tic_loss(logits, t, old, adv, cu_seqlens=cu, process_group=group))


def _on_path(path, call):
    """call() with CPU tensors on the reference path (TRITON_INTERPRET unset) or on the
    kernels (as set when this process imported tic_kernels)."""
    import os
    saved = os.environ.get("TRITON_INTERPRET")
    if path == "reference":
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        return call()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _unowned(rank, group):
    t, old, adv, hidden, mask, logits, weight = _inputs(rank)
    t[1], t[4] = 2 * V_LOCAL, 2 * V_LOCAL + 7  # no rank holds these
    cu = torch.tensor([0, 2, N])
    yield "token_logprobs", lambda: tk.token_logprobs(logits, t, process_group=group)
    yield "linear_token_logprobs", lambda: tk.linear_token_logprobs(
        hidden, weight, t, chunk_size=4, process_group=group)
    yield "tic_loss", lambda: tk.tic_loss(logits, t, old, adv, cu_seqlens=cu,
                                          process_group=group).loss
    yield "linear_tic_loss", lambda: tk.linear_tic_loss(
        hidden, weight, t, old, adv, cu_seqlens=cu, chunk_size=4, process_group=group).loss


def main(rank, world, port):
    import os
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    group = dist.group.WORLD
    path = "kernels" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    for which in ("disagree", "unowned"):
        if which == "unowned":
            os.environ["TIC_KERNELS_CHECK_VALUES"] = "0"  # as under torch.compile
        print("cases:", which)
        _run(_disagreements(rank, group, path) if which == "disagree" else
             _unowned(rank, group), world, group)
    # and an agreed call still runs after every rejected one
    t, *_, logits, _ = _inputs(rank)
    print("agreed", "OK", float(tk.token_logprobs(logits, t, process_group=group).sum()),
          sep="\t")
    exit_process_group()


def _run(cases, world, group):
    for name, call in cases:
        try:
            out = call()
            values = " ".join(f"{v:.4g}" for v in out.detach().reshape(-1).tolist())
            print(name, "OK", values, sep="\t")
        except (TypeError, ValueError, RuntimeError) as e:
            print(name, type(e).__name__, str(e).replace("\n", " "), sep="\t")
        # the group still works: nobody is left inside a collective
        x = torch.ones(1)
        dist.all_reduce(x, group=group)
        assert x.item() == world, x


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
