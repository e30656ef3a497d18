"""Shared benchmark machinery: timing, the measured copy bandwidth, peak memory, records.

- CUDA: device-event timing (triton.testing.do_bench for whole calls; paired events around
  the timed part when each rep needs an untimed set-up, e.g. a forward before a backward):
  the end-to-end time, host work included. Beside it the device time: the same reps with the
  stream pre-filled (a sleep kernel holds the GPU while the host enqueues the rep), so the
  events time the kernels alone; the gap between the two is time the host costs.
- CPU: time.perf_counter around the same calls.
- Every figure is reported as p20/p50/p80 over the reps, GB/s from the op's *minimum* byte
  model (what any implementation must move), and that GB/s as a fraction of the device copy
  bandwidth measured in the same run (bytes read + written by a large tensor copy).
- A provider is checked against the reference before it is timed; one that disagrees is
  recorded as "wrong" and never timed.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from tic_kernels import reference

ROOT = Path(__file__).resolve().parents[1]


def parse_shapes(text):
    """"NxV,NxV" -> [(N, V), ...]"""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def make_batch(N, V, dtype, device, seqlen=1024, seed=0):
    """Padded (B, T) batch with every position a loss token, old log-probs near the current."""
    T = min(seqlen, N)
    B = N // T
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(B, T, V, device=device, dtype=dtype)
    for b in range(B):  # row by row: no fp32 (N, V) temporary
        logits[b] = (torch.randn(T, V, device=device, generator=g) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    with torch.no_grad():
        logp = reference.token_logprobs(logits, targets)
    old = logp + 0.02 * torch.randn(B, T, device=device, generator=g)
    adv = torch.randn(B, device=device, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    # an inference engine's log-probs near the old ones (op 4b's benchmark modes)
    sampler = old + 0.002 * torch.randn(B, T, device=device, generator=g)
    return dict(logits=logits, targets=targets, old=old, adv=adv, mask=mask, sampler=sampler)


SAMPLER_SUFFIX = "+sampler"


def loss_keywords(mode, batch):
    """The loss keywords of a benchmark mode: a ratio, optionally with SAMPLER_SUFFIX (op 4b,
    the sampler's log-probs with sequence_mask, the engine's drift of about 0.002 a token)
    and an objective other than the clip ("token+cispo", "trajectory+sapo", "token+kl_cov"),
    or the top-entropy selection of a fifth of the tokens ("token+top_entropy")."""
    kw = {}
    for objective in ("cispo", "sapo", "kl_cov"):
        if mode.endswith("+" + objective):
            kw["objective"], mode = objective, mode[:-len(objective) - 1]
    if mode.endswith("+top_entropy"):
        kw["top_entropy_quantile"], mode = 0.2, mode[:-len("+top_entropy")]
    if mode.endswith(SAMPLER_SUFFIX):
        return dict(ratio=mode[:-len(SAMPLER_SUFFIX)], rollout_logprobs=batch["sampler"],
                    rollout_is="sequence_mask", **kw)
    return dict(ratio=mode, **kw)


def flash_attn_logprobs():
    """logp(logits (..., V), targets (...)) through flash-attn's Triton cross_entropy (minus its
    per-token loss), or None. The module is loaded from its file when the package's compiled
    part is missing (the Triton op itself needs only torch and triton)."""
    ce = _load_flash_attn_ce()
    if ce is None:
        return None

    def logprobs(logits, targets):
        losses = ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        losses = losses[0] if isinstance(losses, tuple) else losses
        return -losses.view(targets.shape)
    return logprobs


def _load_flash_attn_ce():
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
        return cross_entropy_loss
    except Exception:
        spec = importlib.util.find_spec("flash_attn")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(spec.submodule_search_locations[0], "ops", "triton", "cross_entropy.py")
        if not os.path.exists(path):
            return None
        mod_spec = importlib.util.spec_from_file_location("_fa_cross_entropy", path)
        mod = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(mod)
        except Exception:
            return None
        return mod.cross_entropy_loss


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _quantiles(ms):
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else ms * 9
    return {"p20": q[1], "p50": statistics.median(ms), "p80": q[7]}


def time_ms(fn, device, *, setup=None, reps=None, warmup=2, budget_s=None):
    """p20/p50/p80 milliseconds of fn(), end to end; on CUDA also "device": the same figures
    of the device time (see the module's docstring). ``setup()`` runs untimed before each rep
    and its result is passed to fn. Reps stop at ``reps`` or once the timed total passes
    ``budget_s`` (at least 5 on CUDA), so slow providers (the reference at full size) keep the run
    short."""
    cuda = torch.device(device).type == "cuda"
    reps = reps or (20 if cuda else 5)
    reps = max(reps, MIN_REPS) if cuda else reps  # a CPU dry run may ask for fewer
    budget_s = budget_s if budget_s is not None else (2.0 if cuda else 5.0)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn(setup() if setup else None)
    sync(device)
    warm_ms = 1e3 * (time.perf_counter() - t0) / max(warmup, 1)
    if cuda and setup is None:
        import triton.testing

        # do_bench repeats for about ``rep`` ms: enough for MIN_REPS of a slow call
        q = triton.testing.do_bench(lambda: fn(None), rep=max(100, (MIN_REPS + 1) * warm_ms),
                                    quantiles=[0.2, 0.5, 0.8], return_mode="median")
        out = dict(zip(("p20", "p50", "p80"), q))
    else:
        out = _quantiles(_reps(fn, setup, device, reps, budget_s, hold_ms=None))
    if cuda:
        # hold the GPU for twice the end-to-end time (and 1 ms): longer than the host needs
        # to enqueue the rep, so the kernels run back to back after the start event
        out["device"] = _quantiles(_reps(fn, setup, device, reps, budget_s,
                                         hold_ms=2 * out["p50"] + 1.0))
    return out


MIN_REPS = 5


def _reps(fn, setup, device, reps, budget_s, hold_ms):
    """Milliseconds of each rep: events (CUDA, after a sleep of ``hold_ms`` when given) or
    the host clock."""
    cuda = torch.device(device).type == "cuda"
    times = []
    while len(times) < reps and (len(times) < min(MIN_REPS, reps) or sum(times) < 1e3 * budget_s):
        arg = setup() if setup else None
        sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hold_ms:
                torch.cuda._sleep(int(hold_ms * _sleep_cycles_per_ms()))
            start.record()
            fn(arg)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(arg)
            times.append(1e3 * (time.perf_counter() - t0))
    return times


_CYCLES_PER_MS = []


def _sleep_cycles_per_ms():
    """torch.cuda._sleep's cycles per millisecond on this GPU, measured once."""
    if not _CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles)  # warm
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        _CYCLES_PER_MS.append(cycles / max(start.elapsed_time(end), 1e-3))
    return _CYCLES_PER_MS[0]


def copy_bandwidth_gbps(device):
    """Bytes read + written per second by a device copy of a large buffer (GB/s, 1e9)."""
    cuda = torch.device(device).type == "cuda"
    n = (1 << 30) if cuda else (1 << 28)  # bytes
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda _: dst.copy_(src), device, reps=10 if cuda else 5)["p50"]
    return 2 * n / (ms * 1e-3) / 1e9


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the process's VmHWM on
    Linux CPUs (reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._status("VmHWM") - self.base
        return False


def environment(device):
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        commit = None
    cuda = torch.device(device).type == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "triton": version("triton"),
        "liger_kernel": version("liger_kernel"), "trl": version("trl"),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def record(op, provider, *, pass_, shape, dtype, mode=None, ms=None, bytes_moved=None,
           copy_gbps=None, peak_bytes=None, status="ok", error=None, env=None):
    rec = {"op": op, "provider": provider, "mode": mode, "pass": pass_, "shape": shape,
           "dtype": str(dtype).replace("torch.", ""), "status": status}
    if ms is not None:
        rec["ms"] = {k: round(v, 4) for k, v in ms.items() if k != "device"}
        if "device" in ms:  # the kernels alone (see time_ms)
            rec["device_ms"] = {k: round(v, 4) for k, v in ms["device"].items()}
        if bytes_moved:
            for key, times in (("", rec["ms"]), ("device_", rec.get("device_ms"))):
                if times is None:
                    continue
                gbps = bytes_moved / (times["p50"] * 1e-3) / 1e9
                rec[key + "gbps"] = round(gbps, 2)
                rec[key + "copy_fraction"] = round(gbps / copy_gbps, 4) if copy_gbps else None
    if peak_bytes is not None:
        rec["peak_mib"] = round(peak_bytes / 2**20, 1)
    if error:
        rec["error"] = error[:500]
    if env:
        rec.update(env)
    return rec


def save(records, out_dir, name):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def print_table(records):
    for r in records:
        ms = r.get("ms", {}).get("p50")
        line = (f"{r['op']:15s} {r['provider']:24s} {str(r.get('mode') or ''):12s} "
                f"{r['pass']:8s} {str(r['shape']):28s} {r['dtype']:9s} ")
        if r["status"] != "ok":
            line += f"{r['status']}: {r.get('error', '')[:80]}"
        elif ms is not None:
            line += f"{ms:9.3f} ms"
            if "device_ms" in r:
                line += f" (device {r['device_ms']['p50']:.3f} ms)"
            if "gbps" in r:
                line += f" {r['gbps']:8.1f} GB/s ({100 * (r['copy_fraction'] or 0):5.1f}% of copy)"
            if "peak_mib" in r:
                line += f" peak {r['peak_mib']:.0f} MiB"
        print(line, flush=True)


# Agreement demanded of every provider before it is timed: the loss, and the gradient as a
# relative L2 error (robust to the per-element rounding of low-precision gradients).
CHECK_TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2)}
BYTES_PER_PASS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # (N, V) logits passes in the byte model


def rel_l2(actual, expected):
    """||actual - expected|| / ||expected|| in fp32: robust to the per-element rounding of
    low-precision gradients."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def error_text(e):
    """A provider's exception in one line: its type and the last line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1] if msg else ''}"


def loss_and_grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach().float(), x.grad.float()


def _error_records(op, name, passes, status, err, common):
    return [record(op, name, pass_=p, status=status, error=err, **common) for p in passes]


class unchecked_values:
    """TIC_KERNELS_CHECK_VALUES=0 for a while: timings leave out the value checks' host syncs
    (a training loop that validated its data once runs so), after the correctness check ran
    with them."""

    def __enter__(self):
        self.before = os.environ.get("TIC_KERNELS_CHECK_VALUES")
        os.environ["TIC_KERNELS_CHECK_VALUES"] = "0"

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop("TIC_KERNELS_CHECK_VALUES", None)
        else:
            os.environ["TIC_KERNELS_CHECK_VALUES"] = self.before
        return False


def bench_logits_provider(op, name, fn, logits, want, passes, *, shape, dtype, mode, copy_gbps,
                          env, device, reps=None):
    """Checks ``fn(logits) -> scalar`` (loss and dL/dlogits) against ``want``, then times the
    forward, the backward and both. ``logits`` may have extra trailing positions on dim 1
    (Liger's (B, T + 1, V)): the gradient is compared on the leading ones.

    As in training, each rep's logits are the output of an op (a copy made untimed from a
    source that requires grad), never a leaf, so an in-place backward may overwrite them; the
    backward is ``torch.autograd.grad(loss, logits)``, which stops there (no accumulation
    into a leaf's .grad is timed)."""
    common = dict(shape=shape, dtype=dtype, mode=mode, env=env)
    want_loss, want_grad = want
    src = logits.detach().clone().requires_grad_(True)
    try:
        x = src.clone()
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss, x)
        loss, grad = loss.detach().float(), grad.float()
        grad = grad[tuple(slice(0, n) for n in want_grad.shape)]
        loss_tol, grad_tol = CHECK_TOL[dtype]
        loss_err = abs(loss.item() - want_loss.item()) / max(abs(want_loss.item()), 1e-6)
        grad_err = rel_l2(grad, want_grad)
        del grad, x
        if not (loss_err <= loss_tol and grad_err <= grad_tol):
            return _error_records(op, name, passes, "wrong", (
                f"loss rel err {loss_err:.2e}, grad rel L2 err {grad_err:.2e}"), common)
    except torch.cuda.OutOfMemoryError as e:
        return _error_records(op, name, passes, "oom", str(e), common)
    except Exception as e:  # a provider that cannot run here is reported, not fatal
        return _error_records(op, name, passes, "error", error_text(e), common)

    def fresh():
        return src.clone()

    def forward_for_backward():
        x = src.clone()
        return fn(x), x

    timed = {"fwd": (fn, fresh),
             "bwd": (lambda lx: torch.autograd.grad(*lx), forward_for_backward),
             "fwd+bwd": (lambda x: torch.autograd.grad(fn(x), x), fresh)}
    n_bytes = shape["N"] * shape["V"] * logits.element_size()
    out = []
    with unchecked_values():
        for p in passes:
            body, setup = timed[p]
            try:
                ms = time_ms(body, device, setup=setup, reps=reps)
                arg = setup()
                with PeakMemory(device) as mem:
                    body(arg)
                del arg
                out.append(record(op, name, pass_=p, ms=ms,
                                  bytes_moved=BYTES_PER_PASS[p] * n_bytes, copy_gbps=copy_gbps,
                                  peak_bytes=mem.peak, **common))
            except torch.cuda.OutOfMemoryError as e:
                out += _error_records(op, name, [p], "oom", str(e), common)
    return out
