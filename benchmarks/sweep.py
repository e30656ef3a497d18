"""Launch-configuration sweep of the token log-softmax kernels (the (N, V) passes of every loss).

Times the forward kernel (one read of the logits) and the backward kernel (one read, one write)
alone at one shape over BLOCK_V x num_warps, and records ms, GB/s and the fraction of the copy
bandwidth measured in the same run: one GPU run yields the tuning table. Every configuration's
output is first checked against the default configuration's (to the tests' tolerances: another
block size sums in another order). The JSON is rewritten after each
configuration, and the sweep stops at --budget-s. Then, at a small batch (--split-rows rows,
fewer than the GPU runs programs at once), the backward with its columns shared out over 1 to
16 programs per row and with the default choice ("auto"), and the forward with each row's runs
of columns in programs of their own or not ("auto" the default), each checked bitwise against
one program per row.

    python benchmarks/sweep.py --shape 16384x151936 --dtype bfloat16 --out OUT
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from tic_kernels.ops import token_logprobs as logprobs  # noqa: E402
from tic_kernels.testing import GRAD_TOL, VALUE_TOL, tolerance  # noqa: E402

BLOCKS = (1024, 2048, 4096, 8192)
WARPS = (1, 2, 4, 8)
MAX_PER_THREAD = 64  # elements of one block per thread: more spills registers
SPLITS = (1, 2, 4, 8, 16, None)  # programs per row of the small-batch backward (None: auto)


def configs(blocks=BLOCKS, warps=WARPS):
    return [(b, w) for b, w in itertools.product(blocks, warps) if b // (32 * w) <= MAX_PER_THREAD]


def _kernel_record(records, pass_, fn, shape, dtype, env, device, reps, bytes_moved, copy, *,
                   wrong=None):
    """Appends a kernel pass's record: ``wrong`` (how its output differs from the one it was
    checked against), or else fn timed."""
    if wrong is not None:
        records.append(harness.record("token_logprobs_kernel", pass_, pass_=pass_, shape=shape,
                                      dtype=dtype, status="wrong", error=wrong, env=env))
        return
    ms = harness.time_ms(fn, device, reps=reps)
    records.append(harness.record("token_logprobs_kernel", pass_, pass_=pass_, shape=shape,
                                  dtype=dtype, ms=ms, bytes_moved=bytes_moved, copy_gbps=copy,
                                  env=env))


def run(device, N, V, dtype, *, blocks=BLOCKS, warps=WARPS, budget_s=90.0, save_as=None,
        reps=None):
    env = harness.environment(device)
    copy = harness.copy_bandwidth_gbps(device)
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(N, V, device=device, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    g_logp = torch.randn(N, device=device, generator=g)
    grad = torch.empty_like(logits)
    empty = g_logp.new_empty(0)
    logprobs.LAUNCH_CONFIG.update(fwd=None, bwd=None)
    want_logp, max_logsum, _ = logprobs.token_logprobs_fwd(logits, targets, 1.0, -100, False)
    logprobs.token_logprobs_bwd(logits, grad, targets, max_logsum, empty, g_logp, empty, 1.0, -100, 0)
    want_grad = grad.clone()
    nbytes = N * V * logits.element_size()
    records = [harness.record("copy", "torch.copy_", pass_="copy", shape={}, dtype="float32",
                              env=env) | {"gbps": round(copy, 1)}]
    t0 = time.perf_counter()
    try:
        for block, w in configs(blocks, warps):
            if time.perf_counter() - t0 > budget_s:
                print(f"# sweep: budget of {budget_s:.0f} s spent", flush=True)
                break
            logprobs.LAUNCH_CONFIG.update(fwd=(block, w), bwd=(block, w))
            shape = {"N": N, "V": V, "BLOCK_V": block, "num_warps": w}
            logp, max_logsum, _ = logprobs.token_logprobs_fwd(logits, targets, 1.0, -100, False)
            logprobs.token_logprobs_bwd(logits, grad, targets, max_logsum, empty, g_logp, empty, 1.0, -100, 0)
            ok = (torch.allclose(logp, want_logp, **tolerance(VALUE_TOL, dtype))
                  and torch.allclose(grad.float(), want_grad.float(), **tolerance(GRAD_TOL, dtype)))
            for name, fn, passes in (
                    ("fwd", lambda _: logprobs.token_logprobs_fwd(logits, targets, 1.0, -100, False), 1),
                    ("bwd", lambda _: logprobs.token_logprobs_bwd(
                        logits, grad, targets, max_logsum, empty, g_logp, empty, 1.0, -100, 0), 2)):
                _kernel_record(records, name, fn, shape, dtype, env, device, reps,
                               passes * nbytes, copy,
                               wrong=None if ok else "differs from the default config")
            harness.print_table(records[-2:])
            if save_as:
                harness.save(records, *save_as)
    finally:
        logprobs.LAUNCH_CONFIG.update(fwd=None, bwd=None)
    if save_as:
        harness.save(records, *save_as)
    return records


def run_splits(device, rows, V, dtype, records, *, splits=SPLITS, reps=None, save_as=None):
    """The backward kernel at ``rows`` rows with 1..16 programs per row and the default
    ("auto"), then the forward (with the entropy) with and without each row's runs of
    columns in programs of their own and the default, each checked bitwise against one
    program per row, then timed; appended to records."""
    env = harness.environment(device)
    copy = next((r["gbps"] for r in records if r["op"] == "copy"), None)
    g = torch.Generator(device=device).manual_seed(1)
    logits = (torch.randn(rows, V, device=device, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (rows,), device=device, generator=g)
    g_logp = torch.randn(rows, device=device, generator=g)
    grad, empty = torch.empty_like(logits), g_logp.new_empty(0)
    _, max_logsum, _ = logprobs.token_logprobs_fwd(logits, targets, 1.0, -100, False)

    def backward(_=None):
        logprobs.token_logprobs_bwd(logits, grad, targets, max_logsum, empty, g_logp, empty,
                                    1.0, -100, 0)

    def forward(_=None):
        return logprobs.token_logprobs_fwd(logits, targets, 1.0, -100, True)

    def timed(pass_, fn, same, shape, passes):
        """fn's record: timed when its output was the same as one program per row's."""
        _kernel_record(records, pass_, fn, shape, dtype, env, device, reps,
                       passes * rows * V * logits.element_size(), copy,
                       wrong=None if same else "differs from one program per row")
        harness.print_table(records[-1:])
        if save_as:
            harness.save(records, *save_as)
    try:
        logprobs.LAUNCH_CONFIG["bwd_split"] = 1
        backward()
        want = grad.clone()
        for split in splits:
            logprobs.LAUNCH_CONFIG["bwd_split"] = split
            grad.fill_(float("nan"))
            backward()
            timed("bwd", backward, torch.equal(grad, want),
                  {"N": rows, "V": V, "programs_per_row": split or "auto"}, 2)
    finally:
        logprobs.LAUNCH_CONFIG["bwd_split"] = None
    try:  # the forward: each row's runs of columns in programs of their own, or not
        logprobs.LAUNCH_CONFIG["fwd_split"] = False
        want = forward()
        for split in (False, True, None):
            logprobs.LAUNCH_CONFIG["fwd_split"] = split
            timed("fwd", forward, all(torch.equal(a, b) for a, b in zip(forward(), want)),
                  {"N": rows, "V": V, "split_runs": "auto" if split is None else split}, 1)
    finally:
        logprobs.LAUNCH_CONFIG["fwd_split"] = None
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="16384x151936", help="NxV")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    p.add_argument("--warps", default=",".join(map(str, WARPS)))
    p.add_argument("--budget-s", type=float, default=90.0)
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="sweep")
    p.add_argument("--reps", type=int, default=None, help="timed reps (default: the harness's)")
    p.add_argument("--split-rows", type=int, default=512,
                   help="rows of the small-batch split sweeps (0: skip them)")
    args = p.parse_args(argv)
    N, V = harness.parse_shapes(args.shape)[0]
    save_as = (args.out, args.name)
    records = run(args.device, N, V, getattr(torch, args.dtype),
                  blocks=[int(b) for b in args.blocks.split(",")],
                  warps=[int(w) for w in args.warps.split(",")], budget_s=args.budget_s,
                  save_as=save_as, reps=args.reps)
    if args.split_rows:
        run_splits(args.device, args.split_rows, V, getattr(torch, args.dtype), records,
                   reps=args.reps, save_as=save_as)
        harness.save(records, *save_as)
    print("wrote", os.path.join(args.out, f"{args.name}.json"))


if __name__ == "__main__":
    main()
