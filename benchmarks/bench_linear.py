"""Benchmark of the fused LM head: hidden states -> loss, forward + backward (op 6).

Providers, each checked against the reference (the logits with the value the op's definition
gives them, the head's GEMM in the weight's dtype, and a float32 gradient, through the
reference loss; gradients of hidden and weight) before it is timed. The value matters: logits
left in float32 differ from bf16 ones by a rounding of about 0.01 a token, which a
1024-token trajectory ratio sums into a different loss (the first H100 run rejected every
provider's trajectory rows against such a reference):
  tic_kernels_linear          linear_tic_loss, default options (on a CPU: the chunked
                              reference path)
  tic_kernels_linear_bf16acc  the same with fp32_accumulation=False (d weight accumulated in
                              the weight's dtype: the memory target's setting)
  unfused_tic_kernels         logits = hidden @ weight.T, tic_loss (inplace_backward), and
                              autograd's two GEMMs back: the path users have without op 6
  unfused_reference           the same with the reference loss
  trl_chunked+torch           TRL's selective_log_softmax over row chunks of the logits
                              (TRL's GRPOTrainer computes log-probs a batch chunk at a time),
                              then the reference loss: when TRL imports
  cce+tic_loss                Apple's Cut Cross-Entropy (cut-cross-entropy on PyPI) for the
                              log-probs, -linear_cross_entropy(reduction="none"), then
                              tic_loss_from_logprobs: CUDA only, when it imports
  liger_fused_linear_grpo     Liger-Kernel's LigerFusedLinearGRPOLoss (token level, DAPO):
                              CUDA only, mode "token"

Reported per provider: p20/p50/p80 ms of forward+backward end to end and in device time (at
least 5 repetitions on CUDA), TFLOP/s of the three GEMMs (6 N H V), GB/s and the fraction of
the measured copy bandwidth under a byte model of the minimum traffic (the GEMMs' operands and
results: 4 (N H + V H) s bytes, a lower bound that a GEMM-bound op stays far from), the peak
memory above the inputs, ``extra_mib``: the peak minus the gradients it returns (d hidden and
d weight), the figure op 6's target is about, and ``dw_err64`` / ``dh_err64``: the relative
L2 error of d weight / d hidden against float64 gradients of the same bf16-valued logits (what
the accumulation trades against memory). ``--long-seqlen`` adds a trajectory run whose
sequences are longer than a chunk (two passes over them).

    python benchmarks/bench_linear.py --device cuda --shapes 16384x4096x151936,4096x2048x131072
    python benchmarks/bench_linear.py --device cpu --shapes 2048x256x8192 --chunk-size 512
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
        "tic_kernels_linear_bf16acc": lambda h, w: tk.linear_tic_loss(
            h, w, t, old, adv, chunk_size=chunk_size, fp32_accumulation=False, **kw).loss,
        "unfused_tic_kernels": lambda h, w: tk.tic_loss(
            F.linear(h, w), t, old, adv, inplace_backward=True, **kw).loss,
        "unfused_reference": lambda h, w: ref.tic_loss(F.linear(h, w), t, old, adv, **kw).loss,
    }
    if importlib.util.find_spec("trl") is not None:
        rows = chunk_size or 1024
        out["trl_chunked+torch"] = lambda h, w: ref.tic_loss_from_logprobs(
            _chunked_trl_logp(h, w, t, rows), old, adv, **kw).loss
    if b["hidden"].is_cuda:
        try:
            from cut_cross_entropy import linear_cross_entropy
            out["cce+tic_loss"] = lambda h, w: tk.tic_loss_from_logprobs(
                -linear_cross_entropy(h, w, t, reduction="none"), old, adv, **kw).loss
        except Exception:
            pass
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


def float64_grads(b, mode, rows=2048):
    """(d hidden, d weight) of the reference loss in float64 from logits valued as the head's
    own (the GEMM in the weight's dtype), ``rows`` rows of logits at a time: the log-probs,
    the loss's gradient w.r.t. them, then each chunk's (onehot - softmax) * g through the two
    GEMMs in float64."""
    h, w, t = b["hidden"], b["weight"], b["targets"]
    H, V = h.shape[-1], w.shape[0]
    h2, t2 = h.reshape(-1, H), t.reshape(-1)
    N = h2.shape[0]

    def logits(a):
        return F.linear(h2[a:a + rows], w).double()
    logp = torch.empty(N, dtype=torch.float64, device=h.device)
    for a in range(0, N, rows):
        logp[a:a + rows] = logits(a).log_softmax(-1).gather(1, t2[a:a + rows, None])[:, 0]
    lp = logp.view(t.shape).requires_grad_()
    loss = ref.tic_loss_from_logprobs(lp, b["old"].double(), b["adv"].double(), mask=b["mask"],
                                      ratio=mode).loss
    g, = torch.autograd.grad(loss, lp)
    g = g.reshape(-1)
    w64 = w.double()
    dh = torch.empty(N, H, dtype=torch.float64, device=h.device)
    dw = torch.zeros(V, H, dtype=torch.float64, device=h.device)
    for a in range(0, N, rows):
        G = logits(a).softmax(-1).neg_()
        G.scatter_add_(1, t2[a:a + rows, None], torch.ones_like(G[:, :1]))
        G.mul_(g[a:a + rows, None])
        dh[a:a + rows] = G @ w64
        dw.addmm_(G.t(), h2[a:a + rows].double())
        del G
    return dh.view(h.shape), dw


def _reference_logits(h, w):
    """float32 logits valued as the head's own (F.linear in the weight's dtype), whose
    gradient is the float32 one of hidden @ weight.T."""
    exact = F.linear(h.float(), w.float())
    return exact + (F.linear(h.detach(), w.detach()).float() - exact).detach()


def _grads(fn, h, w):
    loss = fn(h, w)
    return loss, torch.autograd.grad(loss, (h, w))


def run_shape(device, N, H, V, dtype, modes, *, seqlen=1024, chunk_size=None, reps=None,
              only=None, copy, env, save=None, accuracy_only=False):
    """The records of one shape (and sequence length) over ``modes``; ``accuracy_only``: the
    check and the errors against float64, nothing timed (the kernels in the interpreter)."""
    records = []
    b = make_inputs(N, H, V, dtype, device, seqlen=seqlen)
    shape = {"N": N, "H": H, "V": V, "seqlen": min(seqlen, N)}
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
        want_grads = [g.cpu() for g in want_grads]  # off the device while the others run
        exact = [g.cpu() for g in float64_grads(b, mode)]
        for name, fn in providers(b, mode, chunk_size).items():
            if only and name not in only:
                continue
            try:
                loss, grads = _grads(fn, h, w)
                grads = [g.cpu() for g in grads]
                errs = [abs(loss.item() - want_loss.item()) / max(abs(want_loss.item()), 1e-6)]
                errs += [harness.rel_l2(g, wg) for g, wg in zip(grads, want_grads)]
                err64 = [harness.rel_l2(g.double(), e) for g, e in zip(grads, exact)]
                del grads
                tol = harness.CHECK_TOL[dtype]
                if not (errs[0] <= tol[0] and max(errs[1:]) <= tol[1]):
                    recs = [harness.record(OP, name, pass_="fwd+bwd", status="wrong", error=(
                        f"loss rel err {errs[0]:.2e}, d hidden / d weight rel L2 err "
                        f"{errs[1]:.2e} / {errs[2]:.2e}"), **common)]
                elif accuracy_only:
                    rec = harness.record(OP, name, pass_="fwd+bwd", **common)
                    rec["dh_err64"], rec["dw_err64"] = (float(f"{e:.4g}") for e in err64)
                    recs = [rec]
                else:
                    with harness.unchecked_values():
                        ms = harness.time_ms(lambda _: _grads(fn, h, w), device, reps=reps)
                        with harness.PeakMemory(device) as mem:
                            _grads(fn, h, w)
                    rec = harness.record(OP, name, pass_="fwd+bwd", ms=ms, bytes_moved=n_bytes,
                                         copy_gbps=copy, peak_bytes=mem.peak, **common)
                    rec["tflops"] = round(flops / (ms["p50"] * 1e-3) / 1e12, 2)
                    rec["extra_mib"] = round((mem.peak - grad_bytes) / 2**20, 1)
                    rec["dh_err64"], rec["dw_err64"] = (float(f"{e:.4g}") for e in err64)
                    recs = [rec]
            except torch.cuda.OutOfMemoryError as e:
                recs = [harness.record(OP, name, pass_="fwd+bwd", status="oom", error=str(e),
                                       **common)]
            except Exception as e:  # a provider that cannot run here is reported, not fatal
                recs = [harness.record(OP, name, pass_="fwd+bwd", status="error",
                                       error=harness.error_text(e), **common)]
            harness.print_table(recs)
            for r in recs:
                if accuracy_only and "dw_err64" in r:
                    print(f"{'':40s} d weight / d hidden rel L2 vs float64 {r['dw_err64']:.4g}"
                          f" / {r['dh_err64']:.4g}", flush=True)
                if "tflops" in r:
                    print(f"{'':40s} {r['tflops']:.1f} TFLOP/s, {r['extra_mib']:.0f} MiB beyond "
                          f"inputs and gradients, d weight / d hidden rel L2 vs float64 "
                          f"{r['dw_err64']:.3g} / {r['dh_err64']:.3g}", flush=True)
            records += recs
            if save:
                save(records)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return records


def run(device, shapes, dtype, modes, *, chunk_size=None, reps=None, only=None, long_seqlen=None,
        save_as=None, accuracy_only=False):
    env = harness.environment(device)
    copy = harness.copy_bandwidth_gbps(device)
    records = [harness.record("copy", "torch.copy_", pass_="copy", shape={}, dtype="float32",
                              env=env) | {"gbps": round(copy, 1)}]
    print(f"# {env['device']}: device copy {copy:.0f} GB/s", flush=True)

    def save(recs):
        if save_as:
            harness.save(records + recs, *save_as)
    runs = [(shape, 1024, modes) for shape in shapes]
    if long_seqlen:  # sequences longer than a chunk: two passes over each (the sequence ratios)
        runs.append((shapes[0], long_seqlen, [m for m in modes if m != "token"] or ["trajectory"]))
    for (N, H, V), seqlen, run_modes in runs:
        records += run_shape(device, N, H, V, dtype, run_modes, seqlen=seqlen,
                             chunk_size=chunk_size, reps=reps, only=only, copy=copy, env=env,
                             save=save, accuracy_only=accuracy_only)
    t = targets(records)
    records.append({"op": "targets", "provider": "tic_kernels_linear", "pass": "fwd+bwd",
                    "status": "ok", **t})
    print("targets: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in t.items() if not isinstance(v, list)), flush=True)
    for row in t["per_run"]:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    return records


def targets(records):
    """Op 6's targets, each with the measured figures and whether they are met (None when a
    figure is missing), for the default options (``tic_kernels_linear``) and for
    ``fp32_accumulation=False`` (``tic_kernels_linear_bf16acc``, the "bf16acc_" keys). Per
    shape, sequence length and mode: fused fwd+bwd <= 1.0x the unfused path's time (end to
    end; device time beside it), <= 1.0x CCE's, d weight no less accurate than the unfused
    path's against float64 (within 1%: the fp32 sums run in another order); at least 5x faster than Liger's fused linear GRPO loss (token
    level); memory beyond inputs and gradients <= 1.25 GiB at the largest N V measured."""
    ok = [r for r in records if r.get("op") == OP and r["status"] == "ok"]

    def key(r):
        sh = r["shape"]
        return (sh["N"], sh["H"], sh["V"], sh.get("seqlen"), r["mode"])
    runs = {}
    for r in ok:
        runs.setdefault(key(r), {})[r["provider"]] = r

    def ratio(a, b, times="ms"):
        return a[times]["p50"] / b[times]["p50"] if a and b and times in a and times in b \
            else None

    def figures(fused, by):
        unfused = by.get("unfused_tic_kernels")
        return {"time_vs_unfused": ratio(fused, unfused),
                "device_time_vs_unfused": ratio(fused, unfused, "device_ms"),
                "time_vs_cce": ratio(fused, by.get("cce+tic_loss")),
                "speedup_vs_liger": ratio(by.get("liger_fused_linear_grpo"), fused),
                "dw_err_vs_unfused": fused["dw_err64"] / unfused["dw_err64"]
                if fused and unfused and unfused.get("dw_err64") else None,
                "extra_gib": fused["extra_mib"] / 1024 if fused and "extra_mib" in fused
                else None}
    per_run = []
    for (N, H, V, seqlen, mode), by in runs.items():
        row = {"shape": f"{N}x{H}x{V}", "seqlen": seqlen, "mode": mode,
               **figures(by.get("tic_kernels_linear"), by)}
        row.update({"bf16acc_" + k: v for k, v in
                    figures(by.get("tic_kernels_linear_bf16acc"), by).items()})
        unfused = by.get("unfused_tic_kernels")
        row["unfused_extra_gib"] = unfused["extra_mib"] / 1024 \
            if unfused and "extra_mib" in unfused else None
        per_run.append(row)

    def every(values, test):
        values = [v for v in values if v is not None]
        return all(test(v) for v in values) if values else None

    def size(r):
        N, _, V = (int(x) for x in r["shape"].split("x"))
        return N * V
    out = {}
    for prefix in ("", "bf16acc_"):
        rows = [r for r in per_run if r[prefix + "extra_gib"] is not None]
        big = [r for r in rows if size(r) == max(size(q) for q in rows)]
        worst = max((r[prefix + "extra_gib"] for r in big), default=None)  # at the largest N V
        out.update({
            f"{prefix}meets_1.0x_time_vs_unfused": every(
                (r[prefix + "time_vs_unfused"] for r in per_run), lambda v: v <= 1.0),
            f"{prefix}meets_1.0x_time_vs_cce": every(
                (r[prefix + "time_vs_cce"] for r in per_run), lambda v: v <= 1.0),
            f"{prefix}meets_5x_speedup_vs_liger": every(
                (r[prefix + "speedup_vs_liger"] for r in per_run), lambda v: v >= 5.0),
            f"{prefix}meets_dw_no_less_accurate_than_unfused": every(
                (r[prefix + "dw_err_vs_unfused"] for r in per_run), lambda v: v <= 1.01),
            f"{prefix}extra_gib": worst,
            f"{prefix}meets_1.25GiB_extra_gib": None if worst is None else worst <= 1.25})
    out["per_run"] = per_run
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", "--shape", default="16384x4096x151936,4096x2048x131072",
                   help="NxHxV[,NxHxV...]")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", default="trajectory,token")
    p.add_argument("--long-seqlen", type=int, default=None,
                   help="also a run of the first shape with sequences this long (longer than "
                   "a chunk: two passes)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--providers", default=None, help="comma-separated subset")
    p.add_argument("--accuracy-only", action="store_true",
                   help="check and measure d weight / d hidden against float64, time nothing "
                   "(on a CPU under TRITON_INTERPRET=1: the kernels' arithmetic)")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="JSON file name (default: linear_<device>)")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    name = args.name or f"linear_{torch.device(args.device).type}"
    recs = run(args.device, shapes, getattr(torch, args.dtype), args.modes.split(","),
               chunk_size=args.chunk_size, reps=args.reps,
               only=args.providers.split(",") if args.providers else None,
               long_seqlen=args.long_seqlen, save_as=(args.out, name),
               accuracy_only=args.accuracy_only)
    print("wrote", harness.save(recs, args.out, name))


if __name__ == "__main__":
    main()
