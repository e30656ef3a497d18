"""Tolerances and input generators shared by the tests and the benchmarks (one copy of each)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .layout import cu_seqlens_from  # one definition, for the generators and the tests

# (atol, rtol) of a fused result against the reference computed from the same rounded inputs.
# Both compute in fp32 from the same low-precision logits, so values agree to fp32 rounding of a
# logsumexp over V terms, whatever the logits dtype: the input rounding is shared, not an error.
VALUE_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}
# Gradients w.r.t. logits are stored in the logits' dtype: two fp32 values that differ in the
# last bits can round to neighbouring bf16/fp16 numbers, so one ulp relative (2^-7, 2^-10).
# The absolute floor covers the fp32 entropies' own errors (sums of V terms p log p, ~1e-5 at
# V = 50k), which enter every entry of the gradient multiplied by p * dL/dH.
GRAD_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 2 ** -7),
    torch.float16: (1e-5, 2 ** -10),
}
# The O(N) loss: a few fp32 reductions in a different order than the reference's.
LOSS_TOL = (1e-5, 1e-4)
# fp32 sums of thousands of terms (a 2.5k-token sequence) added in another order.
LONG_SUM_TOL = (5e-4, 1e-4)
# Advantages: fp32 group statistics (the kernel) against fp64 ones (the reference).
ADVANTAGE_TOL = (1e-6, 1e-6)
# A compiled graph against eager: the same kernels, other fusions of the O(N) glue.
COMPILE_TOL = (1e-6, 1e-5)
# The reference against the naive float64 loops: fp32 arithmetic of the reference.
NAIVE_TOL = (1e-5, 1e-4)


def entropy_tolerance(V):
    """(atol, rtol) of an fp32 entropy, a sum of V terms p log p of size up to ~log V."""
    return dict(atol=2e-5 * (1 + V ** 0.5 / 10), rtol=2e-5)


def tolerance(table, dtype=None):
    """assert_close keywords from a dtype -> (atol, rtol) table, or from one (atol, rtol)."""
    atol, rtol = table if isinstance(table, tuple) else table[dtype]
    return dict(atol=atol, rtol=rtol)


def as_view(x, kind):
    """x's values in a tensor of another layout: "contiguous", "strided" (every other element
    of a buffer whose other elements are garbage a kernel must not read: NaN, or 7 for
    integers), "transposed" (a buffer whose last two dimensions are swapped) or "offset" (a
    slice that starts inside a larger buffer)."""
    junk = float("nan") if x.is_floating_point() else 7
    if kind == "strided":
        return torch.stack([x, torch.full_like(x, junk)], -1)[..., 0]
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "offset":
        buf = torch.cat([x.new_full((3,), junk), x.reshape(-1)])
        return buf[3:].view(x.shape)
    return x


def random_lengths(num_seqs, max_len, *, allow_empty=True, generator=None):
    """(B,) int64 lengths in [0 or 1, max_len]."""
    low = 0 if allow_empty else 1
    return torch.randint(low, max_len + 1, (num_seqs,), generator=generator)


def mask_from(lengths, T, *, left_pad=False, holes=False, generator=None):
    """(B, T) bool mask with lengths[i] True entries per row: right- or left-padded, or scattered."""
    B = lengths.numel()
    pos = torch.arange(T).expand(B, T)
    if holes:  # each row picks lengths[i] random positions
        keys = torch.rand(B, T, generator=generator)
        rank = keys.argsort(1).argsort(1)
        return rank < lengths[:, None]
    if left_pad:
        return pos >= (T - lengths)[:, None]
    return pos < lengths[:, None]


def _sampled_near(z, targets, drift, B, g):
    """(old, ref, advantages): old and ref log-probs the current ones (of logits z) plus noise
    of std ``drift`` per token, and B advantages."""
    logp = z.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(z, -1)
    old = logp + drift * torch.randn(targets.shape, generator=g)
    ref = logp + drift * torch.randn(targets.shape, generator=g)
    return old, ref, torch.randn(B, generator=g)


@dataclass
class LossBatch:
    """Inputs of tic_loss in one layout; ``layout_kw`` is cu_seqlens=... or mask=..."""
    logits: torch.Tensor
    targets: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    layout_kw: dict = field(default_factory=dict)


def loss_batch(lengths, vocab, *, dtype=torch.float32, padded=False, T=None, device="cpu",
               drift=0.05, logit_scale=2.0, seed=0, target_dtype=torch.int64):
    """A generated batch whose old/ref log-probs sit near the current ones (ratios near 1).

    ``drift`` is the std of logp - logp_old per token, so some ratios fall outside the clip band.
    Padded batches use T = max length (or the given T) with right padding and random holes off.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    B = lengths.numel()
    if padded:
        T = T if T is not None else max(int(lengths.max()) if B else 0, 1)
        shape = (B, T)
    else:
        shape = (int(lengths.sum()),)
    logits = (torch.randn(*shape, vocab, generator=g) * logit_scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    # log-probs of the rounded logits in fp32, so "old" differs from the current only by drift
    old, ref, adv = _sampled_near(logits.float(), targets, drift, B, g)
    if padded:
        mask = mask_from(lengths, T)
        # Masked positions hold garbage a kernel must never read into the loss.
        targets = torch.where(mask, targets, torch.full_like(targets, -7))
        logits = torch.where(mask[..., None], logits, torch.full_like(logits, float("nan")))
        old = torch.where(mask, old, torch.full_like(old, float("nan")))
        ref = torch.where(mask, ref, torch.full_like(ref, float("nan")))
        layout = {"mask": mask}
    else:
        layout = {"cu_seqlens": cu_seqlens_from(lengths)}
    to = dict(device=device)
    return LossBatch(logits.to(**to), targets.to(device=device, dtype=target_dtype),
                     old.to(**to), ref.to(**to), adv.to(**to),
                     {k: v.to(**to) for k, v in layout.items()})


def rollout_keywords(old_logprobs, layout_kw, mode, seed=0, lo=0.8, hi=1.25):
    """Op 4b's keywords for a generated batch: for ``mode`` "weights", weights in [0, 2) with
    every third one 0; else the sampler's log-probs near ``old_logprobs`` (std 0.3, one NaN:
    a token it did not score) with ``mode`` and the bounds. Padded positions hold NaN."""
    g = torch.Generator().manual_seed(seed)
    old = old_logprobs.detach().float().cpu()
    if mode == "weights":
        values = torch.rand(old.shape, generator=g) * 2
        values.view(-1)[::3] = 0.0
    else:
        values = old + 0.3 * torch.randn(old.shape, generator=g)
        values.view(-1)[1] = float("nan")
    if "mask" in layout_kw:
        values = torch.where(layout_kw["mask"].cpu().bool(), values, float("nan"))
    values = values.to(device=old_logprobs.device)
    if mode == "weights":
        return dict(rollout_weights=values)
    return dict(rollout_logprobs=values, rollout_is=mode, rollout_is_min=lo, rollout_is_max=hi)


# The fused LM head against float64 logits computed from the same rounded inputs: the
# gradients pass through the logits gradient rounded to the weight's dtype and a GEMM in that
# dtype, so they are compared by their largest error relative to their largest entry.
HEAD_GRAD_TOL = {
    torch.float32: 2e-5,
    torch.bfloat16: 2 ** -6,
    torch.float16: 2 ** -9,
}


def assert_close_to_scale(actual, expected, rel, msg=""):
    """max |actual - expected| <= rel * max |expected| (plus a tiny floor)."""
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-12, f"{msg}: max error {err:.3g} > {rel:.3g} x {scale:.3g}"


@dataclass
class HeadBatch:
    """Inputs of linear_tic_loss: hidden states and an LM head instead of logits."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    targets: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    layout_kw: dict = field(default_factory=dict)


def head_batch(lengths, vocab, hidden_size=16, *, dtype=torch.float32, padded=False,
               device="cpu", drift=0.3, seed=0):
    """A generated batch for the fused LM head, old/ref log-probs near the current ones.
    Padded rows hold NaN hidden states and garbage targets that must never be read."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    B = lengths.numel()
    if padded:
        T = max(int(lengths.max()) if B else 0, 1)
        shape = (B, T)
    else:
        shape = (int(lengths.sum()),)
    hidden = torch.randn(*shape, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * (2.0 / hidden_size ** 0.5)
    bias = torch.randn(vocab, generator=g) * 0.5
    targets = torch.randint(0, vocab, shape, generator=g)
    old, ref, adv = _sampled_near(torch.nn.functional.linear(hidden, weight, bias), targets,
                                  drift, B, g)
    if padded:
        mask = mask_from(lengths, T)
        hidden = torch.where(mask[..., None], hidden, torch.full_like(hidden, float("nan")))
        targets = torch.where(mask, targets, torch.full_like(targets, -7))
        old = torch.where(mask, old, torch.full_like(old, float("nan")))
        layout = {"mask": mask}
    else:
        layout = {"cu_seqlens": cu_seqlens_from(lengths)}

    def to(t, dt=None):
        return t.to(device=device, dtype=dt or t.dtype)
    return HeadBatch(to(hidden, dtype), to(weight, dtype), to(bias, dtype), to(targets),
                     to(old), to(ref), to(adv), {k: to(v) for k, v in layout.items()})


# aten ops that move no data on the device (metadata, views, uninitialised allocations)
_NO_KERNEL = frozenset((
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
    "_unsafe_view", "as_strided", "expand", "t", "transpose", "unsqueeze", "squeeze", "slice",
    "select", "alias", "detach", "reshape", "permute", "unbind", "split", "narrow", "view_as",
    "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_local_scalar_dense"))
# aten ops that wait for the device and read its values on the host
_HOST_READS = frozenset(("_local_scalar_dense", "nonzero", "masked_select", "_unique2",
                         "repeat_interleave", "lift_fresh"))


def _skip(*args, **meta):
    """A kernel launch that does nothing."""


class Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what a call costs the device: ``kernels``, the Triton kernels launched (by
    name) and the aten ops that compute (say "aten.mul"), in order; ``host_reads``, the
    reads of device values on the host (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``)
    and copies of host numbers to it (``torch.tensor(x, device=...)``, which waits too);
    ``ops`` the torch.library ops of this package that were called; ``peak_bytes``, the most
    bytes of storage allocated under the mode and alive at once (a storage lives while a
    tensor on it, a view included, does). ``stub=True`` skips the Triton kernels themselves
    (their outputs stay uninitialised): what is left is the host's own time
    (benchmarks/host_time.py). Ops inside a torch.library op's body are hidden from the mode,
    except in the ops named in ``into`` (modules whose attribute of that name is the op):
    their bodies run under it. ``count=False``: the stub alone."""

    def __init__(self, stub=False, count=True, into=()):
        super().__init__()
        self.stub, self.count, self.into = stub, count, tuple(into)
        self.kernels, self.ops, self.host_reads = [], [], 0
        self.live, self.live_bytes, self.peak_bytes = {}, 0, 0

    def __enter__(self):
        wrap, tolist = torch.library.wrap_triton, torch.Tensor.tolist
        counter = self

        class Grid:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                return lambda *args, **meta: counter._run(self.kernel, grid, args, meta)

        class Skipped:  # the stub, uncounted: as little host time of its own as can be
            def __getitem__(self, grid):
                return _skip
        skipped = Skipped()

        def read_list(t):
            if self.count:
                self.host_reads += 1
            return tolist(t)
        self._restore = wrap, tolist
        torch.library.wrap_triton = Grid if self.count or not self.stub else \
            (lambda kernel: skipped)
        torch.Tensor.tolist = read_list
        # without counting, no dispatch mode: it would add its own time to every aten op
        return super().__enter__() if self.count else self

    def _run(self, kernel, grid, args, meta):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        if self.stub:
            if self.count:
                self.kernels.append(name)
            return None
        counting, self.count = self.count, False  # the interpreter's own copies of the
        try:  # arguments are not the call's
            return self._restore[0](kernel)[grid](*args, **meta)
        finally:
            self.count = counting
            if counting:
                self.kernels.append(name)

    def __exit__(self, *exc):
        torch.library.wrap_triton, torch.Tensor.tolist = self._restore
        return super().__exit__(*exc) if self.count else False

    def _body(self, name):
        for module in self.into:
            op = getattr(module, name, None)
            if op is not None and hasattr(op, "_init_fn"):
                return op._init_fn
        return None

    def _track(self, out, args):
        """Adds the storages ``out`` allocated (none of the arguments' own) to the live bytes;
        each is dropped when the last tensor on it that the mode saw dies."""
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(args)
                 if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0:
                continue
            if key not in self.live:
                if key in given:
                    continue
                self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.live_bytes += self.live[key][0]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self.live[key][1] += 1
            weakref.finalize(t, self._drop, key)

    def _drop(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live_bytes -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = None
        if self.count:
            namespace, name = str(func).split(".")[:2]
            if namespace == "tic_kernels":
                self.ops.append(name)
                body = self._body(name)
            elif name not in _NO_KERNEL:
                self.kernels.append(f"{namespace}.{name}")
            if name in _HOST_READS:
                self.host_reads += 1
        if body is None:
            out = func(*args, **kwargs)
        else:  # the op's body under this mode (not entered again: the stub stays as it is)
            torch.utils._python_dispatch.TorchDispatchMode.__enter__(self)
            try:
                out = body(*args, **kwargs)
            finally:
                torch.utils._python_dispatch.TorchDispatchMode.__exit__(self, None, None, None)
        if self.count:
            self._track(out, (args, kwargs))
        return out
