"""Op 7: vocabulary-parallel (tensor-parallel) log-probs and loss.

With ``process_group`` given, the logits (or the LM head's weight) hold this rank's contiguous
slice of the vocabulary: rank r holds ids [r V_local, (r + 1) V_local), the same V_local on
every rank (Megatron's layout). Targets are global ids; every other input is replicated.

Each rank runs op 1's kernels over its slice (a target held by another rank is simply not in
it), then the partials combine into the whole vocabulary's values with two all-reduces per
call (tic_kernels.reference.vocab_combine): the row max (4 bytes a row), then the rescaled
sums of exp, the target's term and the entropy term (8 bytes a row, 12 with the entropy).
So 12 bytes a row (16 with the entropy) leave each rank per forward, in two collectives.
The backward communicates nothing: each rank writes its slice's gradient from the saved
whole-vocabulary logsumexp. The fused LM head combines per chunk of rows (two collectives
each) and its d hidden is this rank's partial (see linear_tic_loss).

Before the collectives of a call, the ranks agree on their inputs with one more all-reduce
of a fixed number of integers (a host sync; see ``checked``): a rank whose checks failed, or
ranks that called different functions or differ in V_local, the row count, an option or a
replicated tensor, make every rank raise, rather than one raising and the others waiting in
a collective forever, aborting inside the backend, or computing with other inputs.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from . import logprobs, reference  # logprobs imports this module: its names are read at call time
from .backend import use_triton


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the vocabulary: columns [start, start + size)."""
    group: object
    start: int
    size: int

    @property
    def pair(self):
        """(group, start), as tic_kernels.reference takes it."""
        return self.group, self.start


def _group_size(process_group):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (for example "
                        f"torch.distributed.group.WORLD or one from new_group), got "
                        f"{type(process_group).__name__}")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


# Slots of the agreement vector: every call sends the same number of integers (a call of one
# op on one rank and of another op on another must still meet in one all-reduce of one size)
_SLOTS = 40
_PRIME = 2147483647  # 2^31 - 1: every product below is of two residues under 2^31
_LIMB_WEIGHTS = (1103515245, 1664525013, 1812433253)


def _bits(t):
    """t's values as int64 (floats by their bit patterns, sign-extended), flat."""
    t = t.detach().reshape(-1)
    if t.is_floating_point():
        t = t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t.to(torch.int64)


def fingerprint(t):
    """A 0-d int64 on t's device that equal tensors share (int32 and int64 ids alike, a bool
    and a 0/1 mask alike) and different ones almost surely do not: each value's 64 bits in
    three limbs of 22 bits, mixed with three weights into e_i mod p, then sum_i e_i w_i mod p
    with position weights w_i (a swap of two values changes it), plus the size; p = 2^31 - 1.
    O(numel) on the device, no host sync."""
    v = _bits(t)
    e = torch.zeros_like(v)
    for k, a in enumerate(_LIMB_WEIGHTS):
        e += ((v >> (22 * k)) & ((1 << 22) - 1)) * a % _PRIME
    w = (torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.int64) * 2654435761) % _PRIME
    return ((e % _PRIME * w % _PRIME).sum() + v.numel() * 1000003) % _PRIME


def _code(value):
    """An integer standing for one argument's value on this rank: tensors by fingerprint,
    numbers by value (1 and 1.0 alike), None, strings, booleans and dtypes by name."""
    if isinstance(value, torch.Tensor):
        return fingerprint(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return zlib.crc32(repr(value).encode()) + 1


def path_of(x):
    """The agreement entry saying which implementation this rank runs (the kernels and the
    reference chunk their collectives differently)."""
    return {"the implementation (the Triton kernels or the reference, as the device and "
            "TRITON_INTERPRET choose)": "kernels" if use_triton(x) else "reference"}


def checked(process_group, op, checks, V_local, name, rows, replicated):
    """Runs ``checks(vocab)`` (the call's argument checks, given the whole vocabulary's size)
    and returns (its result, the Shard, or None without a process group).

    With a group, the ranks agree before any other collective, in one all-reduce of a fixed
    number of integers (then one host read): every rank raises a ValueError, and none enters
    a collective, if any rank's checks raised (the failing rank raises its own error), or the
    ranks called different ops (``op``), or hold different V_local (``name``'s vocabulary
    dimension) or row counts, or if any entry of ``replicated(result)`` differs between ranks:
    {argument name: value} of every input that must be the same on every rank, scalars
    compared exactly and tensors by their fingerprint. Each op lists there every option and
    tensor that shapes its collectives (entropy on or off, dtype, chunk plan, masks, targets)
    and the rest of its replicated inputs, so a disagreement is an error, never a hang, an
    abort inside the backend or a silently different result per rank."""
    if process_group is None:
        return checks(V_local), None
    import torch.distributed as dist
    rank, world = _group_size(process_group)
    # gloo reduces CPU tensors; nccl needs them on the rank's device
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
    result, error, labels = None, None, []
    codes = [_code(op), V_local, rows]
    try:
        result = checks(V_local * world)
        entries = replicated(result)
        assert len(entries) + len(codes) < _SLOTS, sorted(entries)
        labels = list(entries)
        codes += [_code(tuple(labels))] + [_code(v) for v in entries.values()]
    except Exception as e:  # re-raised below, once every rank has heard of it
        error = e
        codes = codes[:3]
    codes += [0] * (_SLOTS - len(codes))
    mine = torch.stack([torch.as_tensor(c, dtype=torch.int64).to(device) for c in codes])
    agreed = torch.cat([torch.tensor([int(error is not None)], device=device), mine, -mine])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=process_group)
    agreed = agreed.tolist()  # the one host read
    failed, hi, lo = agreed[0], agreed[1:_SLOTS + 1], [-v for v in agreed[_SLOTS + 1:]]
    if error is not None:
        # dropped as it leaves: this frame holding the error that holds this frame would be a
        # cycle keeping the caller's tensors and process group alive until the cyclic GC (at
        # exit, gloo's group then aborts the process while it is torn down)
        try:
            raise error
        finally:
            error = None
    if failed:
        raise ValueError("process_group: another rank's inputs were rejected (its error says "
                         "why); this rank's passed the checks")
    if hi[0] != lo[0]:
        raise ValueError(f"process_group: the ranks called different functions at once (this "
                         f"rank called {op}); every rank of the group must make the same call")
    if hi[1] != lo[1]:
        raise ValueError(f"{name}: every rank of process_group must hold the same number of "
                         f"vocabulary columns (V_local); they range from {lo[1]} to {hi[1]}")
    if hi[2] != lo[2]:
        raise ValueError(f"targets: every rank of process_group must hold the same rows "
                         f"(the inputs other than the vocabulary are replicated); the row "
                         f"counts range from {lo[2]} to {hi[2]}")
    if hi[3] != lo[3]:
        raise ValueError(f"process_group: the ranks passed different sets of arguments to "
                         f"{op} (this rank: {', '.join(labels)}); every rank of the group must "
                         f"make the same call")
    differ = [label for i, label in enumerate(labels, 4) if hi[i] != lo[i]]
    if differ:
        raise ValueError(f"{differ[0]}: differs between the ranks of process_group, where "
                         f"every input but the vocabulary shard must be the same (replicated)"
                         + (f"; so do {', '.join(differ[1:])}" if differ[1:] else ""))
    return result, Shard(process_group, rank * V_local, V_local)


def loss_inputs(options, targets, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
                temperature, entropy_coef, **more):
    """The replicated inputs of a loss call, as ``checked`` compares them: the tensors, the
    checked keywords (``options``, the sampler correction's tensors included) and ``more``."""
    return dict(targets=targets, old_logprobs=old_logprobs, advantages=advantages,
                cu_seqlens=cu_seqlens, mask=mask, ref_logprobs=ref_logprobs,
                temperature=temperature, entropy_coef=entropy_coef, **options, **more)


def rows_of(t):
    """The row count the ranks compare (-1 for something that is not a tensor)."""
    return t.numel() if isinstance(t, torch.Tensor) else -1


def columns_of(t, dim=-1):
    """t.shape[dim], or 0 when t is not a tensor with that dimension."""
    return t.shape[dim] if isinstance(t, torch.Tensor) and t.dim() else 0


def kernel_logprobs(logits, targets, temperature, ignore_index, with_entropy, shard):
    """Op 1's forward kernel over this rank's slice, combined across the group: (logp (R,),
    lse (2R,), entropy (R,) or (0,)) of the whole vocabulary, fp32, as token_logprobs_fwd
    returns them. targets (R,) contiguous, global ids."""
    R = targets.numel()
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.empty(R, **f32), torch.empty(2 * R, **f32)
    entropy = torch.empty(R if with_entropy else 0, **f32)
    logprobs.launch_fwd(logits, targets, logp, lse, entropy, temperature, ignore_index, with_entropy,
               shard.start)
    return combine(logp, lse, entropy, targets, ignore_index, shard)


def combine(logp, lse, entropy, targets, ignore_index, shard):
    """reference.vocab_combine on the kernels' flat buffers (lse (2R,), entropy (R,) or (0,))."""
    logp, lse, H = reference.vocab_combine(logp, lse.view(-1, 2),
                                           entropy if entropy.numel() else None, targets,
                                           ignore_index, shard.start, shard.size, shard.group)
    return logp, lse.reshape(-1), entropy if H is None else H


class _TokenLogprobs(torch.autograd.Function):
    """The kernels' path of op 1 over a vocabulary shard; the backward is op 1's kernel with
    the whole vocabulary's lse and this shard's column offset."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy, shard):
        flat_t = targets.reshape(-1).contiguous()
        logp, lse, entropy = kernel_logprobs(logits, flat_t, temperature, ignore_index,
                                             with_entropy, shard)
        ctx.save_for_backward(logits, flat_t, lse, entropy)
        ctx.options = temperature, ignore_index, with_entropy, shard.start
        return logp, entropy

    @staticmethod
    @reference.first_order_only
    def backward(ctx, g_logp, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, start = ctx.options
        if g_logp is None:  # only the entropy was used
            g_logp = torch.zeros_like(targets, dtype=torch.float32)
        grad = logprobs.logits_grad(logits, targets, lse, entropy, g_logp,
                           g_entropy if with_entropy else None, temperature, ignore_index,
                           vocab_start=start)
        return grad, None, None, None, None, None


def token_logprobs(logits, targets, temperature, ignore_index, return_entropy, shard,
                   kernels):
    """tic_kernels.token_logprobs over a vocabulary shard (inputs checked): the kernels
    (logits 2-D or 3-D) or the reference."""
    if not kernels:
        return reference.vocab_token_logprobs(logits, targets, temperature, ignore_index,
                                              return_entropy, *shard.pair)
    logp, entropy = _TokenLogprobs.apply(logits, targets, float(temperature), int(ignore_index),
                                         bool(return_entropy), shard)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


def name_of(shard):
    """The group's name, as the custom ops (whose schema cannot hold a ProcessGroup) take it:
    "" without a shard."""
    return "" if shard is None else shard.group.group_name


def from_name(group_name, V_local):
    """The Shard of this rank for the group named ``group_name`` ("": None)."""
    if not group_name:
        return None
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group
    group = _resolve_process_group(group_name)
    return Shard(group, dist.get_rank(group) * V_local, V_local)
