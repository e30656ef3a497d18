"""Benchmark of the fused LM head: hidden states -> loss, forward + backward (op 6).

Providers, each checked against the reference (the logits with the value the op's definition
gives them, the head's GEMM in the weight's dtype, and a float32 gradient, through the
reference loss; gradients of hidden and weight) before it is timed. The value matters: logits
left in float32 differ from bf16 ones by a rounding of about 0.01 a token, which a
1024-token trajectory ratio sums into a different loss (the first H100 run rejected every
provider's trajectory rows against such a reference):
  tic_kernels_linear          linear_tic_loss (on a CPU: the chunked reference path)
  tic_kernels_linear_accw     the same with fp32_accumulation=False
  unfused_tic_kernels         logits = hidden @ weight.T, tic_loss (inplace_backward), and
                              autograd's two GEMMs back: the path users have without op 6
  unfused_reference           the same with the reference loss
  trl_chunked+torch           TRL's selective_log_softmax over row chunks of the logits
                              (TRL's GRPOTrainer computes log-probs a batch chunk at a time),
                              then the reference loss: when TRL imports
  liger_fused_linear_grpo     Liger-Kernel's LigerFusedLinearGRPOLoss (token level, DAPO):
                              CUDA only, mode "token"

Reported per provider: p20/p50/p80 ms of forward+backward, TFLOP/s of the three GEMMs
(6 N H V), GB/s and the fraction of the measured copy bandwidth under a byte model of the
minimum traffic (the GEMMs' operands and results: 4 (N H + V H) s bytes, a lower bound that a
GEMM-bound op stays far from), the peak memory above the inputs, and ``extra_mib``: the peak
minus the gradients it returns (d hidden and d weight), the figure op 6's target is about.

    python benchmarks/bench_linear.py --device cuda --shape 16384x4096x151936 --dtype bfloat16
    python benchmarks/bench_linear.py --device cpu --shape 8192x256x32000 --dtype float32
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tic_kernels as tk  # noqa: E402
from tic_kernels import reference as ref  # noqa: E402

OP = "linear_tic_loss"


def make_inputs(N, H, V, dtype, device, seqlen=1024, seed=0):
    """Padded (B, T) rows, every position a loss token; old log-probs near the current."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = min(seqlen, N)
    B = N // T
    hidden = torch.randn(B, T, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    with torch.no_grad():
        logp = tk.linear_token_logprobs(hidden, weight, targets)
    old = logp + 0.05 * torch.randn(B, T, generator=g).to(device)
    return dict(hidden=hidden, weight=weight, targets=targets, old=old,
                adv=torch.randn(B, generator=g).to(device),
                mask=torch.ones(B, T, dtype=torch.bool, device=device))


def _chunked_trl_logp(hidden, weight, targets, rows):
    from trl.trainer.utils import selective_log_softmax
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts = [selective_log_softmax(F.linear(h[a:a + rows], weight).float(), t[a:a + rows])
             for a in range(0, h.shape[0], rows)]
    return torch.cat(parts).view(targets.shape)


def providers(b, mode, chunk_size=None):
    """name -> fn(hidden, weight) -> scalar loss."""
    t, old, adv, mask = b["targets"], b["old"], b["adv"], b["mask"]
    kw = dict(mask=mask, ratio=mode)
    out = {
        "tic_kernels_linear": lambda h, w: tk.linear_tic_loss(
            h, w, t, old, adv, chunk_size=chunk_size, **kw).loss,
        "tic_kernels_linear_accw": lambda h, w: tk.linear_tic_loss(
            h, w, t, old, adv, chunk_size=chunk_size, fp32_accumulation=False, **kw).loss,
        "unfused_tic_kernels": lambda h, w: tk.tic_loss(
            F.linear(h, w), t, old, adv, inplace_backward=True, **kw).loss,
        "unfused_reference": lambda h, w: ref.tic_loss(F.linear(h, w), t, old, adv, **kw).loss,
    }
    if importlib.util.find_spec("trl") is not None:
        rows = chunk_size or 1024
        out["trl_chunked+torch"] = lambda h, w: ref.tic_loss_from_logprobs(
            _chunked_trl_logp(h, w, t, rows), old, adv, **kw).loss
    if mode == "token" and b["hidden"].is_cuda:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2,
                                             epsilon_high=0.28, loss_type="dapo",
                                             importance_sampling_level="token")
            out["liger_fused_linear_grpo"] = lambda h, w: liger(
                h, w, t, mask.int(), adv, old_per_token_logps=old)[0]
        except Exception:
            pass
    return out


def _reference_logits(h, w):
    """float32 logits valued as the head's own (F.linear in the weight's dtype), whose
    gradient is the float32 one of hidden @ weight.T."""
    exact = F.linear(h.float(), w.float())
    return exact + (F.linear(h.detach(), w.detach()).float() - exact).detach()


def _grads(fn, h, w):
    loss = fn(h, w)
    return loss, torch.autograd.grad(loss, (h, w))


def run(device, N, H, V, dtype, modes, *, chunk_size=None, reps=None, only=None,
        save_as=None):
    env = harness.environment(device)
    copy = harness.copy_bandwidth_gbps(device)
    records = [harness.record("copy", "torch.copy_", pass_="copy", shape={}, dtype="float32",
                              env=env) | {"gbps": round(copy, 1)}]
    print(f"# {env['device']}: device copy {copy:.0f} GB/s", flush=True)
    b = make_inputs(N, H, V, dtype, device)
    shape = {"N": N, "H": H, "V": V}
    s = torch.finfo(dtype).bits // 8
    n_bytes = 4 * (N * H + V * H) * s
    flops = 6 * N * H * V
    grad_bytes = (N * H + V * H) * s
    h = b["hidden"].clone().requires_grad_()
    w = b["weight"].clone().requires_grad_()
    for mode in modes:
        common = dict(shape=shape, dtype=dtype, mode=mode, env=env)
        want_loss, want_grads = _grads(lambda h_, w_: ref.tic_loss(
            _reference_logits(h_, w_), b["targets"], b["old"], b["adv"], mask=b["mask"],
            ratio=mode).loss, h, w)
        for name, fn in providers(b, mode, chunk_size).items():
            if only and name not in only:
                continue
            try:
                loss, grads = _grads(fn, h, w)
                errs = [abs(loss.item() - want_loss.item()) / max(abs(want_loss.item()), 1e-6)]
                errs += [harness.rel_l2(g, wg) for g, wg in zip(grads, want_grads)]
                del grads
                tol = harness.CHECK_TOL[dtype]
                if not (errs[0] <= tol[0] and max(errs[1:]) <= tol[1]):
                    recs = [harness.record(OP, name, pass_="fwd+bwd", status="wrong", error=(
                        f"loss rel err {errs[0]:.2e}, d hidden / d weight rel L2 err "
                        f"{errs[1]:.2e} / {errs[2]:.2e}"), **common)]
                else:
                    with harness.unchecked_values():
                        ms = harness.time_ms(lambda _: _grads(fn, h, w), device, reps=reps)
                        with harness.PeakMemory(device) as mem:
                            _grads(fn, h, w)
                    rec = harness.record(OP, name, pass_="fwd+bwd", ms=ms, bytes_moved=n_bytes,
                                         copy_gbps=copy, peak_bytes=mem.peak, **common)
                    rec["tflops"] = round(flops / (ms["p50"] * 1e-3) / 1e12, 2)
                    rec["extra_mib"] = round((mem.peak - grad_bytes) / 2**20, 1)
                    recs = [rec]
            except torch.cuda.OutOfMemoryError as e:
                recs = [harness.record(OP, name, pass_="fwd+bwd", status="oom", error=str(e),
                                       **common)]
            except Exception as e:  # a provider that cannot run here is reported, not fatal
                recs = [harness.record(OP, name, pass_="fwd+bwd", status="error",
                                       error=harness.error_text(e), **common)]
            harness.print_table(recs)
            for r in recs:
                if "tflops" in r:
                    print(f"{'':40s} {r['tflops']:.1f} TFLOP/s, {r['extra_mib']:.0f} MiB beyond "
                          "inputs and gradients", flush=True)
            records += recs
            if save_as:
                harness.save(records, *save_as)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    t = targets(records)
    records.append({"op": "targets", "provider": "tic_kernels_linear", "pass": "fwd+bwd",
                    "status": "ok", **t})
    print("targets: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in t.items()), flush=True)
    return records


def targets(records):
    """Op 6's targets, each with the measured figure and whether it is met (None when a figure
    is missing): fused fwd+bwd <= 1.0x the unfused path's time (the first mode measured) and
    >= 1.5x faster than Liger's fused linear GRPO loss (token level); memory beyond inputs and
    gradients <= 1.25 GiB."""
    def get(provider, mode=None):
        for r in records:
            if r.get("provider") == provider and r["status"] == "ok" and "ms" in r \
                    and (mode is None or r.get("mode") == mode):
                return r
    fused, unfused = get("tic_kernels_linear"), get("unfused_tic_kernels")
    fused_tok, liger = get("tic_kernels_linear", "token"), get("liger_fused_linear_grpo", "token")
    out = {
        "time_vs_unfused": fused["ms"]["p50"] / unfused["ms"]["p50"] if fused and unfused else None,
        "speedup_vs_liger_token": liger["ms"]["p50"] / fused_tok["ms"]["p50"]
        if liger and fused_tok else None,
        "extra_gib": fused["extra_mib"] / 1024 if fused else None,
        "unfused_extra_gib": unfused["extra_mib"] / 1024 if unfused else None,
    }
    for key, bound, ok in (("time_vs_unfused", "1.0x", lambda v: v <= 1.0),
                           ("speedup_vs_liger_token", "1.5x", lambda v: v >= 1.5),
                           ("extra_gib", "1.25GiB", lambda v: v <= 1.25)):
        out[f"meets_{bound}_{key}"] = None if out[key] is None else ok(out[key])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="16384x4096x151936", help="NxHxV")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", default="trajectory,token")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--providers", default=None, help="comma-separated subset")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="JSON file name (default: linear_<device>)")
    args = p.parse_args(argv)
    N, H, V = (int(x) for x in args.shape.split("x"))
    name = args.name or f"linear_{torch.device(args.device).type}"
    recs = run(args.device, N, H, V, getattr(torch, args.dtype), args.modes.split(","),
               chunk_size=args.chunk_size, reps=args.reps,
               only=args.providers.split(",") if args.providers else None,
               save_as=(args.out, name))
    print("wrote", harness.save(recs, args.out, name))


if __name__ == "__main__":
    main()
