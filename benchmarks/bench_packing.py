"""Benchmark of pack + unpack (the C++/CUDA extension against the pure-PyTorch fallback).

A (B, T) batch with random lengths, right padding and a prompt/completion split; pack, then
unpack a (N_all, 1024) bf16 hidden-state tensor back to (B, T, 1024), each timed alone and
together. Byte model: pack reads the masks and ids (B T (2 + s_ids)) and writes the packed
fields; unpack reads the packed hidden states and writes the padded (B, T, 1024) output.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from tic_kernels import reference as ref  # noqa: E402
from tic_kernels.ops import packing  # noqa: E402

OP = "packing"
HIDDEN = 1024


def make_batch(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    attn = torch.arange(T)[None] < lengths[:, None]
    prompt = torch.randint(1, T // 8, (B,), generator=g)
    comp = attn & (torch.arange(T)[None] >= prompt[:, None])
    ids = torch.randint(0, 150000, (B, T), generator=g)
    return ids.to(device), attn.to(device), comp.to(device)


def run(device, shapes, reps=None):
    env = harness.environment(device)
    copy = harness.copy_bandwidth_gbps(device)
    records = []
    for B, T in shapes:
        ids, attn, comp = make_batch(B, T, device)
        want = ref.varlen_pack(ids, attn, comp)
        n_all = want.input_ids.numel()
        hidden = torch.randn(n_all, HIDDEN, device=device, dtype=torch.bfloat16)
        impls = {"extension": packing.pack, "pytorch": ref.varlen_pack}
        for name, pack in impls.items():
            if name == "extension" and not packing._has_kernel("pack", ids.device):
                records.append(harness.record(OP, name, pass_="pack+unpack", shape={"B": B, "T": T},
                                              dtype="int64", status="error",
                                              error="extension not built for this device"))
                continue
            unpack = packing.unpack if name == "extension" else ref.varlen_unpack
            got = pack(ids, attn, comp)
            ok = all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors()))
            if not ok:
                records.append(harness.record(OP, name, pass_="pack+unpack", shape={"B": B, "T": T},
                                              dtype="int64", status="wrong", error="differs from reference"))
                continue
            indices = want.indices
            pack_bytes = B * T * (2 + ids.element_size()) + n_all * (ids.element_size() + 24)
            unpack_bytes = B * T * HIDDEN * hidden.element_size() + hidden.numel() * hidden.element_size()
            steps = {"pack": (lambda _: pack(ids, attn, comp), pack_bytes),
                     "unpack": (lambda _: unpack(hidden, indices, B, T), unpack_bytes)}
            steps["pack+unpack"] = (lambda _: (steps["pack"][0](_), steps["unpack"][0](_)),
                                    pack_bytes + unpack_bytes)
            for pass_, (step, moved) in steps.items():
                ms = harness.time_ms(step, device, reps=reps)
                with harness.PeakMemory(device) as mem:
                    step(None)
                rec = harness.record(OP, name, pass_=pass_, shape={"B": B, "T": T, "hidden": HIDDEN},
                                     dtype="bfloat16", ms=ms, bytes_moved=moved, copy_gbps=copy,
                                     peak_bytes=mem.peak, env=env)
                harness.print_table([rec])
                records.append(rec)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="64x4096", help="BxT,...")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    print("wrote", harness.save(run(args.device, harness.parse_shapes(args.shapes)), args.out,
                                f"{OP}_{torch.device(args.device).type}"))


if __name__ == "__main__":
    main()
