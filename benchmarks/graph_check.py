"""CUDA-graph capture of the loss, forward and backward, with the value checks off: the check
that no op of the path reads a value back to the host or copies one from it (either breaks a
capture). Replays the graph on new data and compares with eager. Exit 0 when it captures and
agrees, 1 otherwise; on a machine without CUDA it says so and exits 0.

    python benchmarks/graph_check.py
"""
from __future__ import annotations

import os
import sys

import torch

import tic_kernels as tk
from tic_kernels.testing import cu_seqlens_from


def main(N=4096, V=32000, dtype=torch.bfloat16):
    if not torch.cuda.is_available():
        print("graph: skipped (no CUDA device)")
        return 0
    os.environ["TIC_KERNELS_CHECK_VALUES"] = "0"
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    lengths = torch.tensor([N // 4 - 3, 0, N // 4 + 3, N // 2])
    cu = cu_seqlens_from(lengths).to(dev)
    src = (torch.randn(N, V, device=dev, generator=g) * 2).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    old = torch.randn(N, device=dev, generator=g) * 0.01 - 10.5
    ref = old + 0.01 * torch.randn(N, device=dev, generator=g)
    adv = torch.randn(len(lengths), device=dev, generator=g)
    kw = dict(cu_seqlens=cu, ref_logprobs=ref, beta=0.04, entropy_coef=0.01)

    def step():
        loss = tk.tic_loss(src * 1, targets, old, adv, **kw).loss
        return (loss,) + torch.autograd.grad(loss, src)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static = step()
    except Exception as e:
        print(f"graph: capture failed: {type(e).__name__}: {e}")
        return 1
    with torch.no_grad():  # new data in the captured buffers, then replay against eager
        src.copy_((torch.randn(N, V, device=dev, generator=g) * 2).to(dtype))
        adv.copy_(torch.randn(len(lengths), device=dev, generator=g))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    ok = all(torch.equal(a, b) for a, b in zip(static, eager))
    print(f"graph: {'captured, replay equals eager' if ok else 'replay differs from eager'} "
          f"(loss {static[0].item():.6f} vs {eager[0].item():.6f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
