"""Host time of one call: the Python and PyTorch work around the kernels, measured on the CPU
with every Triton launch stubbed out (the kernels' own time is the GPU's; this is what the
host spends before the GPU can start them, and what decides small batches).

    python benchmarks/host_time.py [--reps 60] [--rounds 20] [--json OUT]

Runs the kernels' path (TRITON_INTERPRET=1, set here before triton is imported) on small CPU
tensors, with the value checks on (the default) and off, for tic_loss and token_logprobs,
forward alone and forward + backward (torch.autograd.grad to the logits), and prints the
least time of any call in microseconds: --rounds rounds, each of --reps calls of every case
in turn (a shared VM's slow spells, which last seconds, then reach every case alike). The
stub leaves out Triton's own launch work (its argument handling, about the same for any
caller of a Triton kernel) and the interpreter. Also
counts, per call, the device kernels (Triton launches and aten ops that compute) and host
reads, which tests/test_launches.py pins.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # the kernels' path on CPU tensors (before triton loads)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import tic_kernels as tk  # noqa: E402
from tic_kernels.testing import Launches, loss_batch  # noqa: E402


def _cases(padded):
    """{name: (the call's output (a scalar), the logits)}. A small vocabulary: the host's work
    does not depend on it, and large CPU allocations (which a GPU's caching allocator does
    not make) would add their own time."""
    batch = loss_batch([96, 0, 128, 64], 64, padded=padded)
    logits = batch.logits.clone().requires_grad_(True)
    targets = batch.targets if not padded else batch.targets.masked_fill(
        ~batch.layout_kw["mask"], 0)

    def loss(ratio):
        return lambda: tk.tic_loss(logits, batch.targets, batch.old_logprobs, batch.advantages,
                                   ratio=ratio, **batch.layout_kw).loss

    def logprobs():
        return tk.token_logprobs(logits, targets).sum()
    layout = "padded" if padded else "packed"
    return {f"tic_loss token {layout}": (loss("token"), logits),
            f"tic_loss trajectory {layout}": (loss("trajectory"), logits),
            f"token_logprobs {layout}": (logprobs, logits)}


def _best_us(fn, reps):
    """The fastest of reps calls of fn(), in microseconds, the garbage collector off: on a
    shared (virtual) machine the other figures measure the neighbours as much as the call."""
    times = []
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - t0))
    finally:
        gc.enable()
    return min(times)


def measure(reps, rounds):
    """{case: {checks on/off: {fwd_us, fwd_bwd_us, fwd_kernels, bwd_kernels, host_reads}}}."""
    results, timed = {}, []
    for padded in (False, True):
        for name, (call, logits) in _cases(padded).items():
            results[name] = {}
            for checks in ("1", "0"):
                os.environ["TIC_KERNELS_CHECK_VALUES"] = checks
                one = torch.ones(())  # the backward's seed, made once (the caller's)
                with Launches(stub=True) as fwd:
                    out = call()
                with Launches(stub=True) as bwd:
                    torch.autograd.grad(out, logits, one)

                def fwd_bwd(call=call, logits=logits, one=one):  # autograd.grad: no
                    torch.autograd.grad(call(), logits, one)  # accumulation into .grad
                row = results[name]["checks " + ("on" if checks == "1" else "off")] = dict(
                    fwd_us=float("inf"), fwd_bwd_us=float("inf"), fwd_kernels=fwd.kernels,
                    bwd_kernels=bwd.kernels, host_reads=fwd.host_reads + bwd.host_reads)
                timed.append((checks, row, call, fwd_bwd))
    with Launches(stub=True, count=False):
        for checks, _, _, fwd_bwd in timed:  # warm up
            os.environ["TIC_KERNELS_CHECK_VALUES"] = checks
            for _ in range(5):
                fwd_bwd()
        for _ in range(rounds):
            for checks, row, call, fwd_bwd in timed:
                os.environ["TIC_KERNELS_CHECK_VALUES"] = checks
                row["fwd_us"] = min(row["fwd_us"], _best_us(call, reps))
                row["fwd_bwd_us"] = min(row["fwd_bwd_us"], _best_us(fwd_bwd, reps))
    os.environ.pop("TIC_KERNELS_CHECK_VALUES")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measure(args.reps, args.rounds)
    for name, rows in results.items():
        for checks, row in rows.items():
            print(f"{name:34s} {checks:10s} fwd {row['fwd_us']:7.1f} us  fwd+bwd "
                  f"{row['fwd_bwd_us']:7.1f} us  kernels fwd {len(row['fwd_kernels'])} bwd "
                  f"{len(row['bwd_kernels'])}  host reads {row['host_reads']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "reps": args.reps, "rounds": args.rounds,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
