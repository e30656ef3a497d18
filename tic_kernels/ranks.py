"""The ranks of a process group agreeing on a call before its collectives (op 7).

Every public op that takes ``process_group`` runs ``agree`` first: the ranks all-reduce a
fixed number of integers that stand for the call (the function, V_local, the row count, every
option and a fingerprint of every replicated tensor, which implementation runs) and raise on
every rank, before any other collective, when they differ or when a rank's own argument checks
failed. So an inconsistent or bad input is a ValueError on every rank, never a hang, an abort
inside the backend, or a result computed from inputs the other ranks do not share. The op
modules sit above this one; it imports none of them.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from . import validation as check
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
_SLOTS = 64
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


def agree(process_group, op, checks, V_local, name, rows, replicated):
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
        with check.one_read():
            return checks(V_local), None
    import torch.distributed as dist
    rank, world = _group_size(process_group)
    # gloo reduces CPU tensors; nccl needs them on the rank's device
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
    result, error, labels = None, None, []
    codes = [_code(op), V_local, rows]
    with check.gathered() as values:  # the value checks' flags travel in the all-reduce
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
    failed_here = torch.tensor([int(error is not None)], device=device)
    if error is None and (flags := values.failed()) is not None:
        failed_here = failed_here.maximum(flags.reshape(1).to(device=device, dtype=torch.int64))
    agreed = torch.cat([failed_here, mine, -mine])
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=process_group)
    agreed = agreed.tolist()  # the one host read
    failed, hi, lo = agreed[0], agreed[1:_SLOTS + 1], [-v for v in agreed[_SLOTS + 1:]]
    if error is not None:
        values.raise_first()  # a value check that failed before the error comes first
        # dropped as it leaves: this frame holding the error that holds this frame would be a
        # cycle keeping the caller's tensors and process group alive until the cyclic GC (at
        # exit, gloo's group then aborts the process while it is torn down)
        try:
            raise error
        finally:
            error = None
    if failed:
        values.raise_first()  # this rank's own value check, if one failed (the error path)
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


def loss_inputs(config, rollout, targets, old_logprobs, advantages, cu_seqlens, mask,
                ref_logprobs, **more):
    """The replicated inputs of a loss call, as ``agree`` compares them: the tensors, the
    LossConfig's every field, the sampler correction's tensor and ``more``."""
    return dict(targets=targets, old_logprobs=old_logprobs, advantages=advantages,
                cu_seqlens=cu_seqlens, mask=mask, ref_logprobs=ref_logprobs,
                **config.agreement(), **config.rollout_inputs(rollout), **more)


def rows_of(t):
    """The row count the ranks compare (-1 for something that is not a tensor)."""
    return t.numel() if isinstance(t, torch.Tensor) else -1


def columns_of(t, dim=-1):
    """t.shape[dim], or 0 when t is not a tensor with that dimension."""
    return t.shape[dim] if isinstance(t, torch.Tensor) and t.dim() else 0


def exit_process_group(code=0):
    """End a process that used a gloo process group: every rank meets at a barrier, the group
    is torn down and the process exits with ``code`` without the interpreter's finalization.

    With torch's gloo backend a worker thread can still hold the last reference to a finished
    collective's work object (and through it to tensors owned by Python) after the group is
    destroyed; when it drops that reference while the interpreter finalizes, the thread cannot
    take the GIL and the process aborts ("terminate called without an active exception",
    SIGABRT) after all its work was done. Leaving with ``os._exit`` after the output is
    flushed skips that race; files the caller opened must be closed first.
    """
    import logging
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still talks
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
