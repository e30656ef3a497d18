"""Op 6's loss: ``linear_tic_loss``, tic_loss over the LM head's logits without holding them
(the chunked head of ops/lm_head.py, op 1's row kernels and op 4's ratio kernels).

In bf16 and fp32 the gradient is formed in the forward: as soon as a chunk's log-probs are
known, so are its tokens' gradient coefficients, and the chunk's logits gradient, d hidden
and d weight follow at once (three GEMMs per chunk, like the unfused path); the backward
only scales them by the incoming gradient, on the device and not at all when it is 1. The
chunk plan (chunk_plan): for the token-level ratios weighted per token, k rows-equal chunks
that may cut sequences (each chunk's coefficients from the sequences clipped to it; the loss
and its statistics over whole sequences once every log-prob is known); for the others, runs
of whole sequences of about equal rows, and a sequence longer than a chunk in equal pieces
(its log-probs first, then each piece but the last recomputed: one more GEMM each). In fp16
the incoming gradient carries a GradScaler's loss scale, which must reach the gradient
before it is rounded: there the log-probs' two passes run, then op 4's kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ranks, reference
from .. import validation as check
from ..backend import first_order_only, grads_by_name, use_triton
from ..config import LossConfig, loss_call
from ..layout import aggregation_norm, ignoring_masked, row_chunks
from ..options import IGNORE_INDEX
from ..output import LossOutput
from . import vocab_parallel
from .lm_head import (ChunkedHead, active_rows, autocast_inputs, compact, grad_shapes,
                      grads_needed, largest, linear_logprobs, rows_per_chunk)
from .ratio_loss import (launch_finalize, launch_ratio_fwd, loss_on_segments, new_partials,
                         stats_dict)
from .ratio_loss_kernels import STAT_KEYS
from .scale import scale_once
from .token_selection import token_flags


def by_rows(config) -> bool:
    """Whether each token's gradient coefficient follows from its own row and its sequence's
    advantage alone: the token-level ratios ("token", "none") weighted per token (no
    seq-mean-token-mean, no sampler weight per sequence, nothing that weighs its tokens by the
    whole sequence: VESPO, the off-policy mask). Their chunks are rows-equal and may cut
    sequences; the other ratios' chunks hold whole sequences."""
    return (config.ratio in ("token", "none") and config.aggregation != "seq-mean-token-mean"
            and not config.rollout_per_sequence and config.objective != "vespo"
            and config.off_policy_mask_threshold is None)


def _filled(cu, cap):
    """Runs [s0, s1) of consecutive sequences, each filled while its rows stay within ``cap``
    (a longer sequence is a run of its own)."""
    runs, s0, B = [], 0, len(cu) - 1
    while s0 < B:
        s1 = s0 + 1
        while s1 < B and cu[s1 + 1] - cu[s0] <= cap:
            s1 += 1
        runs.append((s0, s1))
        s0 = s1
    return runs


def sequence_groups(cu, max_rows):
    """Runs [s0, s1) of consecutive sequences (cu: the B + 1 row offsets, on the host): the
    fewest runs whose rows fit ``max_rows`` (a longer sequence is a run of its own, done in
    pieces), balanced: filled to the least bound that keeps them that few."""
    runs = _filled(cu, max_rows)
    lo, hi = 1, max_rows  # the least cap with as few runs, by bisection (fewer with more)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_filled(cu, mid)) <= len(runs):
            hi = mid
        else:
            lo = mid + 1
    return _filled(cu, lo)


def chunk_plan(config, cu, n, max_rows):
    """The fused head's plan: [(sequences, chunks)], each chunks a list of row ranges [a, b)
    of at most ``max_rows`` rows whose gradient coefficients are known once their log-probs
    are. Rows-equal chunks (``by_rows``; sequences None; no host read) or runs of whole
    sequences (sequences = (s0, s1); a sequence longer than a chunk in equal pieces, two
    passes; reads cu on the host: one sync)."""
    if by_rows(config):
        return [(None, [c]) for c in row_chunks(0, n, max_rows)]
    cu_host = cu.tolist()
    return [((s0, s1), row_chunks(cu_host[s0], cu_host[s1], max_rows))
            for s0, s1 in sequence_groups(cu_host, max_rows)]


@torch.library.custom_op("tic_kernels::linear_loss", mutates_args=())
def linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor],
                advantages: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                mask: Optional[torch.Tensor], rollout: Optional[torch.Tensor], config: str,
                chunk_rows: int, fp32_accumulation: bool, need_dh: bool, need_dw: bool,
                need_db: bool, group_name: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats (len(STAT_KEYS),), d hidden, d weight, d bias) for hidden (R, H) and
    per-token (R,) tensors, packed (cu_seqlens) or padded (mask (B, T), R = B T); the
    gradients are those of the loss itself (each empty when not needed), the backward scales
    them. ``config`` an encoded LossConfig, ``rollout`` its sampler correction's tensor.
    ``group_name`` (op 7; "" none): the head is that group's vocabulary shard, d hidden this
    shard's partial."""
    cfg = LossConfig.decode(config)
    dev = hidden.device
    if mask is not None:  # the loss rows, packed
        rows = active_rows(mask.reshape(-1).bool())
        cu = torch.nn.functional.pad(mask.sum(1, dtype=torch.int64).cumsum(0), (1, 0))
    else:
        rows, cu = None, cu_seqlens.contiguous()
    t, old = compact(targets, rows).contiguous(), compact(old, rows).float().contiguous()
    ref = None if ref is None else compact(ref, rows).float().contiguous()
    rollout = None if rollout is None else compact(rollout, rows).contiguous()
    n, B = t.numel(), cu.numel() - 1
    lengths = cu.diff().double()
    norm = aggregation_norm(cfg.aggregation, (lengths > 0).sum().double(), lengths.sum(),
                            cfg.num_sequences, cfg.num_tokens, cfg.max_len).float()
    f32 = dict(dtype=torch.float32, device=dev)
    with_entropy = cfg.with_entropy
    logp, max_logsum = torch.empty(n, **f32), torch.empty(2 * n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    # rows-equal chunks: zeros, for rows outside every sequence (cu_seqlens not covering the
    # batch, its value check off) are in a chunk but no sequence's, and get no gradient
    rows_equal = by_rows(cfg)
    new = torch.zeros if rows_equal else torch.empty
    coef = new(n, **f32)
    coef_ent = new(n, **f32) if with_entropy else torch.empty(0, **f32)
    part, loss, stats, norm_out = new_partials(B, dev)
    advantages = advantages.float().contiguous()
    grad = need_dh or need_dw or need_db
    plan = chunk_plan(cfg, cu, n, chunk_rows)

    def ratio_pass(s0, s1, cu_rows, part_rows):
        launch_ratio_fwd(logp, old, ref, entropy if with_entropy else None,
                         advantages[s0:s1], cu_rows, None, rollout, coef, coef_ent, part_rows,
                         cfg, flags=flags)

    pieces = [c for _, cs in plan for c in cs]
    head = ChunkedHead(hidden, weight, bias, rows, largest(pieces), cfg.temperature,
                       IGNORE_INDEX, fp32_accumulation, need_dh, need_dw, need_db,
                       vocab_parallel.from_name(group_name, weight.shape[0]), len(pieces))
    if head.dh.numel() and rows is None and pieces and (pieces[0][0] > 0 or pieces[-1][1] < n):
        # rows outside every sequence (cu_seqlens not covering the batch, its value check
        # off): no chunk writes them, and zero is their gradient
        head.dh.zero_()
    # the batch-wide selections (KL-Cov's covariances, the top-entropy quantile) rank every
    # loss token: all log-probs and entropies first (the logits' forward GEMM once more per
    # chunk but the last, whose logits the gradients, taken in reverse order, start from),
    # then the chunks' coefficients and gradients
    selecting, flags, last = cfg.selects_tokens, None, None

    def log_probs(chunks):
        """The chunks' log-probs; returns the last one's logits (z, x), still in the buffer."""
        last = None
        for a, b in chunks:
            last = head.forward(a, b, t, logp, max_logsum, entropy)
        if chunks:
            head.combine(chunks[0][0], chunks[-1][1], t, logp, max_logsum, entropy)
        return last
    if selecting:
        for _, chunks in plan:
            last = log_probs(chunks) if chunks else last
        flags = token_flags(cfg, logp, entropy, advantages, cu, None, 0)
    for k, (seqs, chunks) in enumerate(reversed(plan) if selecting else plan):
        if not selecting:
            last = log_probs(chunks)
        if seqs is not None:  # whole sequences: their loss terms and coefficients
            ratio_pass(seqs[0], seqs[1], cu[seqs[0]:seqs[1] + 1], part[seqs[0]:seqs[1]])
        elif grad:  # rows [a, b): their coefficients, over the sequences clipped to them
            ratio_pass(0, B, cu.clamp(*chunks[0]), part)
        if not grad:
            continue
        # the last chunk's logits are still in the buffer (selecting: the plan's last); a
        # sequence in pieces recomputes the others' (one more GEMM each)
        for i, (a, b) in enumerate(reversed(chunks)):
            z, x = head.logits(a, b) if i or (selecting and k) else last
            head.backward(z, x, a, b, t, max_logsum, entropy, coef[a:b] * norm,
                          coef_ent[a:b] * (cfg.entropy_coef * norm) if cfg.entropy_bonus
                          else coef_ent[:0])
    z = x = last = None  # no view of the logits buffer outlives the loop
    if rows_equal:  # the loss and its statistics over whole sequences
        ratio_pass(0, B, cu, part)
    launch_finalize(part, loss, stats, norm_out, cfg)
    return (loss, stats) + head.grads()


@linear_loss.register_fake
def _(hidden, weight, bias, targets, old, ref, advantages, cu_seqlens, mask, rollout, config,
      chunk_rows, fp32_accumulation, need_dh, need_dw, need_db, group_name):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (torch.empty((), **f32), torch.empty(len(STAT_KEYS), **f32)) + grad_shapes(
        hidden, weight, bias, need_dh, need_dw, need_db)


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.needs = inputs[-4:-1]  # need_dh, need_dw, need_db
    # the statistics and the gradients are results, not functions of the inputs to
    # differentiate (as tic_loss's statistics); nothing flows back from them, and autograd
    # must not materialise zeros in their shapes (d weight's: a second (V, H) matrix)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


@first_order_only
def _loss_backward(ctx, g_loss, *_unused):
    # the forward's gradients are the loss's own: scaled by g_loss on the device, once
    if g_loss is None:
        return grads_by_name(linear_loss)
    dh, dw, db = scale_once(ctx, g_loss, [t if need else None for t, need in
                                          zip(ctx.saved_tensors, ctx.needs)], "linear_tic_loss")
    return grads_by_name(linear_loss, hidden=dh, weight=dw, bias=db)


linear_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


def linear_tic_loss(hidden, weight, targets, old_logprobs, advantages, *, bias=None,
                    cu_seqlens=None, mask=None, chunk_size=None, fp32_accumulation=True,
                    ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.28,
                    dual_clip=None, max_log_ratio=20.0, aggregation=None, temperature=1.0,
                    ref_logprobs=None, beta=0.0, entropy_coef=0.0, num_tokens=None,
                    num_sequences=None, max_len=None, process_group=None,
                    rollout_logprobs=None, rollout_is=None, rollout_is_max=None,
                    rollout_is_min=None, rollout_weights=None, objective="clip", delta=None,
                    sapo_tau_pos=1.0, sapo_tau_neg=1.05, dro_beta=None, vespo_k_pos=2.0,
                    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_cov_ratio=None,
                    kl_cov_coef=None, kl_bias_correction=False, off_policy_mask_threshold=None,
                    top_entropy_quantile=1.0):
    """``tic_loss(hidden @ weight.T + bias, ...)`` without materialising the logits.

    Args:
        hidden: packed (N, H) with ``cu_seqlens``, or padded (B, T, H) with ``mask``; rows
            outside the mask are never multiplied and get zero gradient.
        weight, bias, chunk_size, fp32_accumulation, process_group: as in
            :func:`linear_token_logprobs` (under a process group, d hidden is this rank's
            partial, to be summed over the group by the caller).
        Every other argument: as in :func:`tic_kernels.tic_loss`.

    Returns:
        LossOutput(loss, stats) as tic_loss, differentiable w.r.t. hidden, weight and bias.
        When a gradient is required, the forward forms it (the backward only scales it by
        the incoming gradient), so call backward once per forward; in float16 the gradient is
        formed in the backward instead (a loss scale must reach it before it is rounded).
        Under torch.autocast the head runs in the autocast dtype, as F.linear would.
    """
    keywords = dict(
        ratio=ratio, clip_mode=clip_mode, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        max_log_ratio=max_log_ratio, aggregation=aggregation, beta=beta,
        entropy_coef=entropy_coef, temperature=temperature, num_tokens=num_tokens,
        num_sequences=num_sequences, max_len=max_len, ref_logprobs=ref_logprobs, mask=mask,
        rollout_logprobs=rollout_logprobs, rollout_is=rollout_is, rollout_is_max=rollout_is_max,
        rollout_is_min=rollout_is_min, rollout_weights=rollout_weights, objective=objective,
        delta=delta, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, dro_beta=dro_beta,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, kl_cov_ratio=kl_cov_ratio, kl_cov_coef=kl_cov_coef,
        kl_bias_correction=kl_bias_correction,
        off_policy_mask_threshold=off_policy_mask_threshold,
        top_entropy_quantile=top_entropy_quantile)

    def checks(vocab):
        nonlocal hidden, weight, bias
        hidden, weight, bias = autocast_inputs(hidden, weight, bias)
        check.lm_head("hidden", hidden, weight, bias, chunk_size, fp32_accumulation)
        return loss_call("hidden", hidden, "H", vocab, targets, old_logprobs, advantages,
                         cu_seqlens, mask, ref_logprobs, keywords)

    (config, rollout), shard = ranks.agree(
        process_group, "linear_tic_loss", checks, ranks.columns_of(weight, 0),
        "weight", ranks.rows_of(targets), lambda checked: ranks.loss_inputs(
            *checked, targets, old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
            chunk_size=chunk_size, fp32_accumulation=fp32_accumulation,
            **{"hidden's dtype": hidden.dtype, "hidden's width (H)": hidden.shape[-1]},
            **ranks.path_of(hidden)))
    if not use_triton(hidden):
        return reference.linear_tic_loss(hidden, weight, targets, old_logprobs, advantages,
                                         bias, cu_seqlens=cu_seqlens, mask=mask,
                                         temperature=config.temperature,
                                         ref_logprobs=ref_logprobs, chunk_size=chunk_size,
                                         fp32_accumulation=fp32_accumulation,
                                         shard=None if shard is None else shard.pair,
                                         **config.reference_keywords(rollout))
    group_name = vocab_parallel.name_of(shard)
    chunk_rows = rows_per_chunk(chunk_size, weight)
    if hidden.dtype == torch.float16:
        # fp16 training scales the loss (GradScaler) so that small gradients survive fp16:
        # the scale arrives with the incoming gradient, so the logits gradient is formed in
        # the backward, after it (the log-probs' two passes, then op 4's kernels)
        t = ignoring_masked(targets, mask)
        logp, _, entropy = linear_logprobs(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, t.reshape(-1).contiguous(),
            config.temperature, IGNORE_INDEX, config.with_entropy, chunk_rows, fp32_accumulation,
            group_name)
        loss, stats, *_ = loss_on_segments(
            logp.view(t.shape), old_logprobs, advantages, cu_seqlens, mask, ref_logprobs,
            entropy.view(t.shape) if config.with_entropy else None, rollout, config)
        return LossOutput(loss, stats_dict(stats, config))
    loss, stats, *_ = linear_loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
        old_logprobs.detach().reshape(-1),
        None if ref_logprobs is None else ref_logprobs.detach().reshape(-1),
        advantages.detach(), cu_seqlens, mask,
        None if rollout is None else rollout.detach().reshape(-1), config.encode(), chunk_rows,
        fp32_accumulation, *grads_needed(hidden, weight, bias), group_name)
    return LossOutput(loss, stats_dict(stats, config))
