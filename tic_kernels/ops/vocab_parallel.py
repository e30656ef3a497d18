"""Op 7: vocabulary-parallel (tensor-parallel) log-probs and loss: combining the shards.

With ``process_group`` given, the logits (or the LM head's weight) hold this rank's contiguous
slice of the vocabulary: rank r holds ids [r V_local, (r + 1) V_local), the same V_local on
every rank (Megatron's layout). Targets are global ids; every other input is replicated.

Each rank runs op 1's kernels over its slice (a target held by another rank is simply not in
it), then the partials combine into the whole vocabulary's values with two all-reduces per
call (``combine_partials``, which the reference uses too): the row max (4 bytes a row), then
the rescaled sums of exp, the target's term and the entropy term (8 bytes a row, 12 with the
entropy). So 12 bytes a row (16 with the entropy) leave each rank per forward, in two
collectives. The backward communicates nothing: each rank writes its slice's gradient from
the saved whole-vocabulary logsumexp. The fused LM head combines per chunk of rows (two
collectives each) and its d hidden is this rank's partial (see linear_tic_loss).

Before the collectives of a call, the ranks agree on their inputs with one more all-reduce
of a fixed number of integers (a host sync; see tic_kernels.ranks.agree): a rank whose
checks failed, or ranks that called different functions or differ in V_local, the row count,
an option or a replicated tensor, make every rank raise, rather than one raising and the
others waiting in a collective forever, aborting inside the backend, or computing with other
inputs. Op 1 over a shard lives with op 1 (ops/token_logprobs.py), the fused head's with op 6
(ops/lm_head.py, lm_head_loss.py); this module holds what they share.
"""
from __future__ import annotations

import torch

from ..ranks import Shard


def combine_partials(logp, max_logsum, entropy, targets, ignore_index, start, V_local, group):
    """The whole vocabulary's (logp, max_logsum (R, 2), entropy) from every rank's partials
    (entropy None: not wanted). With M the row max over the ranks and a_r = sum over shard r of
    exp(z - M): log S = log sum_r a_r, logp = (logp_r + log a_r) - log S on the rank r owning
    the target, H = sum_r a_r (H_r - log a_r) / S + log S. Communication per row: one MAX
    all-reduce of 1 float and one SUM all-reduce of 2 floats (3 with the entropy), in the
    partials' dtype: 12 bytes (16) in fp32."""
    import torch.distributed as dist
    m, log_s = max_logsum.unbind(-1)
    M = m.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(M == -torch.inf, 0.0, M)
    log_a = (m - shift) + log_s  # -inf when every logit of the shard is -inf
    a = log_a.exp()
    t = targets - start
    owned = (t >= 0) & (t < V_local)
    parts = [a, torch.where(owned, torch.where(m == -torch.inf, -torch.inf, logp + log_a), 0.0)]
    if entropy is not None:
        parts.append(torch.where(a > 0, a * (entropy - log_a), 0.0))
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=group)
    log_S = sums[0].log()
    active = targets != ignore_index
    # a target that no rank holds (outside the whole vocabulary, reachable only with the value
    # checks off) has no owner term: NaN, as op 1 gives it, never the plausible -log S
    whole = V_local * dist.get_world_size(group)
    held = (targets >= 0) & (targets < whole)
    logp = torch.where(active, torch.where(held, sums[1] - log_S, torch.nan), 0.0)
    H = None if entropy is None else torch.where(active, sums[2] / sums[0] + log_S, 0.0)
    return logp, torch.stack([torch.where(active, shift, 0.0),
                              torch.where(active, log_S, 0.0)], -1), H


def combine(logp, max_logsum, entropy, targets, ignore_index, shard):
    """combine_partials on the kernels' buffers (logp and entropy in the shape of targets,
    entropy None or (0,) when not computed; max_logsum (2R,))."""
    wanted = entropy is not None and entropy.numel()
    logp, max_logsum, H = combine_partials(logp, max_logsum.view(*targets.shape, 2),
                                           entropy if wanted else None, targets,
                                           ignore_index, shard.start, shard.size, shard.group)
    return logp, max_logsum.reshape(-1), entropy if H is None else H


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
