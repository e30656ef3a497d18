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
of 5 integers (a host sync): a rank whose checks failed, a V_local or a row count that
differs between ranks makes every rank raise, rather than one raising and the others
waiting in a collective forever.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import logprobs, reference  # logprobs imports this module: its names are read at call time


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


def checked(process_group, checks, V_local, rows, name):
    """Runs ``checks(vocab)`` (the call's argument checks, given the whole vocabulary's size)
    and returns (its result, the Shard, or None without a process group).

    With a group, the ranks agree collectively before any other collective: if any rank's
    checks raised, or V_local (``name``'s last dimension) or the row count differs between
    ranks, every rank raises (the failing rank its own error)."""
    if process_group is None:
        return checks(V_local), None
    import torch.distributed as dist
    rank, world = _group_size(process_group)
    result, error = None, None
    try:
        result = checks(V_local * world)
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    # gloo reduces CPU tensors; nccl needs them on the rank's device
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
    mine = [int(error is not None), V_local, -V_local, rows, -rows]
    agreed = torch.tensor(mine, dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=process_group)
    failed, v_hi, v_lo, r_hi, r_lo = agreed.tolist()
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
    if v_hi != -v_lo:
        raise ValueError(f"{name}: every rank of process_group must hold the same number of "
                         f"vocabulary columns (V_local); they range from {-v_lo} to {v_hi}")
    if r_hi != -r_lo:
        raise ValueError(f"targets: every rank of process_group must hold the same rows "
                         f"(the inputs other than the vocabulary are replicated); the row "
                         f"counts range from {-r_lo} to {r_hi}")
    return result, Shard(process_group, rank * V_local, V_local)


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
