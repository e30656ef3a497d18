"""Op 4's objective, per unit and per token, as the Triton kernels evaluate it: the ratio of
a token or of its sequence (capped), what each objective makes of it (the clipped surrogate
with its delta and dual clip, CISPO's detached clipped weight, SAPO's soft gate, DPPO's trust
region, DRO's quadratic penalty, GMPO's clipped geometric mean, VESPO's gamma weight, KL-Cov's
unclipped ratio with its penalty on the tokens selected for it), the sampler correction's
weights, the top-entropy selection, the KL term (with its bias correction), and from them each
token's gradient coefficient. ops/ratio_loss_kernels.py's loss kernel calls them in its passes
over a sequence, the two-pass loss (ops/tic_loss_two_pass.py) per row.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..options import (OBJECTIVES, RATIOS, VESPO_LOG_W_MAX, VESPO_LOG_W_MIN,
                       VESPO_MIN_LAMBDA)

# The kernels' switches by name: a mode's code is its position in options.RATIOS /
# OBJECTIVES (the strings users pass).
RATIO_CODE = {r: i for i, r in enumerate(RATIOS)}
TRAJECTORY, SEQUENCE_MEAN, TOKEN, NO_RATIO = (
    tl.constexpr(RATIO_CODE[r]) for r in ("trajectory", "sequence_mean", "token", "none"))
OBJECTIVE_CODE = {o: i for i, o in enumerate(OBJECTIVES)}
CLIP, CISPO, SAPO, DPPO_TV, DPPO_KL, DRO, GMPO, VESPO, KL_COV = (
    tl.constexpr(OBJECTIVE_CODE[o]) for o in ("clip", "cispo", "sapo", "dppo_tv", "dppo_kl",
                                              "dro", "gmpo", "vespo", "kl_cov"))
# param_pos / param_neg (param2_pos / param2_neg), the objective's parameters by the
# advantage's sign (LossConfig.objective_parameters): SAPO's temperatures, DRO's dro_beta,
# VESPO's shapes k (and rates lambda), KL-Cov's penalty weight
_LOG_W_MIN = tl.constexpr(VESPO_LOG_W_MIN)
_LOG_W_MAX = tl.constexpr(VESPO_LOG_W_MAX)
_MIN_LAMBDA = tl.constexpr(VESPO_MIN_LAMBDA)

# The sampler correction (op 4b): none, a weight per token or per sequence from the sampler's
# log-probs, or weights given per token.
ROLLOUT_CODE = {None: 0, "token": 1, "sequence": 2, "weights": 3}
RW_TOKEN, RW_SEQUENCE, RW_GIVEN = (tl.constexpr(ROLLOUT_CODE[k])
                                   for k in ("token", "sequence", "weights"))

# The bits of the batch-wide selections' per-token flags (ops/token_selection.py, token_flags):
# KL-Cov's penalised tokens, and the tokens the top-entropy quantile keeps.
FLAG_KL_COV, FLAG_KEPT = tl.constexpr(1), tl.constexpr(2)

@triton.jit
def selection_flag(sel_ptr, idx, keep, FLAG: tl.constexpr):
    """1.0 where the tokens' selection flags carry FLAG, else 0.0."""
    flags = tl.load(sel_ptr + idx, mask=keep, other=0).to(tl.int32)
    return ((flags & FLAG) != 0).to(tl.float32)


@triton.jit
def _clamp(x, lo, hi):
    """min(max(x, lo), hi) that keeps NaN: plain tl.minimum / tl.maximum compile to PTX min /
    max, which drop a NaN operand, and the NaN rule would be lost on the GPU."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clipped_objective(x, A, eps_low, eps_high, dual_clip, delta, param_pos, param_neg,
                       TWO_SIDED: tl.constexpr, DUAL: tl.constexpr, OBJECTIVE: tl.constexpr,
                       HAS_DELTA: tl.constexpr):
    """(J, dJ/dx, clipped, xc) for ratio x and advantage A: scalars or blocks alike. xc is the
    clipped ratio, CISPO's detached weight (its J and dJ are 0 here: its objective
    xc A logp is formed per token, see token_coefficient, as DPPO's, DRO's and VESPO's are)."""
    hi = 1.0 + eps_high
    if TWO_SIDED:
        xc = _clamp(x, 1.0 - eps_low, hi)
    else:
        xc = tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)
    if OBJECTIVE == SAPO:
        # the soft gate: J = sigmoid(tau (x - 1)) 4 / tau A, tau by the advantage's sign
        tau = tl.where(A > 0, param_pos, param_neg)
        gate = tl.sigmoid(tau * (x - 1.0))
        return gate * (4.0 / tau) * A, 4.0 * gate * (1.0 - gate) * A, x * 0.0, xc
    if OBJECTIVE == CISPO:
        return x * 0.0, x * 0.0, (xc != x).to(tl.float32), xc
    if OBJECTIVE == VESPO or OBJECTIVE == DRO:  # formed per token, nothing clipped
        return x * 0.0, x * 0.0, x * 0.0, xc
    if OBJECTIVE == GMPO or OBJECTIVE == KL_COV:  # x A unclipped (GMPO clipped its tokens'
        return x * A, x * 0.0 + A, x * 0.0, x     # log-ratios, in gmpo_log_ratio)
    xu = x
    if HAS_DELTA:  # the unclipped branch bounded above by delta (constant beyond it)
        xu = tl.minimum(x, delta, propagate_nan=tl.PropagateNan.ALL)
    unclipped = xu * A
    constant = xc * A
    take = unclipped <= constant  # ties (x inside the band) pass the gradient A
    J = tl.where(take, unclipped, constant)
    dJ = tl.where(take, A, 0.0)
    if HAS_DELTA:
        dJ = tl.where(x > delta, 0.0, dJ)
    clipped = (~take).to(tl.float32)
    if DUAL:
        floor = dual_clip * A
        # (A < 0) and (J < floor), as arithmetic: `&` of two scalar compares fails in the
        # interpreter
        lift = ((A < 0).to(tl.float32) * (J < floor).to(tl.float32)) > 0
        J = tl.where(lift, floor, J)
        dJ = tl.where(lift, 0.0, dJ)
        clipped = tl.where(lift, 1.0, clipped)
    return J, dJ, clipped, xc


@triton.jit
def gmpo_log_ratio(d, A, eps_low, eps_high, TWO_SIDED: tl.constexpr):
    """GMPO's token log-ratio d clipped on the side the advantage pushes it: (min(d, eps_high)
    for A > 0, max(d, -eps_low) for A < 0 (not clipped with the upper-only clip), 0 for A = 0;
    1.0 where the bound replaced d; 1.0 where d's gradient passes)."""
    up = (d > eps_high).to(tl.float32)  # a NaN d is not clipped (it stays NaN)
    down = up * 0.0
    if TWO_SIDED:
        down = (d < -eps_low).to(tl.float32)
    clipped = tl.where(A > 0, up, tl.where(A < 0, down, 0.0))
    bound = tl.where(A > 0, eps_high, -eps_low)
    dc = tl.where(A == 0, d * 0.0, tl.where(clipped > 0, bound, d))
    active = tl.where(A == 0, 0.0, 1.0 - clipped)
    return dc, clipped, active


@triton.jit
def vespo_log_weight(log_w):
    """A term of VESPO's log-weight clamped to [log 1e-8, 20], as TRL's."""
    return _clamp(log_w, _LOG_W_MIN, _LOG_W_MAX)


@triton.jit
def vespo_sampler_log_weight(w):
    """The clamped log of a sampler weight w >= 0 (0 gives log 1e-8, as log(0) clamped)."""
    return vespo_log_weight(tl.log(tl.maximum(w, 1e-30)))


@triton.jit
def vespo_weight(log_w, A, k_pos, k_neg, lambda_pos, lambda_neg):
    """VESPO's detached gamma weight phi(w) = exp(lambda + k log w - lambda w) (phi(1) = 1) of
    a sequence's log-weight (clamped by vespo_log_weight), (k, lambda) = (k_pos, lambda_pos)
    for A >= 0 else the _neg pair, lambda at least 1e-4; a NaN or infinite phi is 0 (TRL's)."""
    log_w = vespo_log_weight(log_w)
    k = tl.where(A >= 0, k_pos, k_neg)
    lam = tl.maximum(tl.where(A >= 0, lambda_pos, lambda_neg), _MIN_LAMBDA)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    finite = (phi == phi) & (tl.abs(phi) < float("inf"))
    return tl.where(finite, phi, 0.0)


@triton.jit
def _dppo_weight(lp, old, x, A, eps_low, eps_high, delta, OBJECTIVE: tl.constexpr,
                 HAS_DELTA: tl.constexpr):
    """DPPO's detached weight of a token: its ratio x (at most delta), 0 outside the trust
    region of its probability: p - p_old <= eps_high for A > 0, >= -eps_low otherwise
    (DPPO_TV), or the binary KL of (p_old, p) within eps_high / eps_low unless p moved against
    the advantage's push (DPPO_KL)."""
    p = tl.exp(lp)
    p_old = tl.exp(old)
    if OBJECTIVE == DPPO_TV:
        up = (p - p_old) <= eps_high
        down = (p - p_old) >= -eps_low
    else:
        kl = p_old * (old - lp) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        up = ((kl <= eps_high).to(tl.float32) + (p <= p_old).to(tl.float32)) > 0
        down = ((kl <= eps_low).to(tl.float32) + (p >= p_old).to(tl.float32)) > 0
    w = x
    if HAS_DELTA:
        w = tl.minimum(x, delta, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(tl.where(A > 0, up, down), w, 0.0)


@triton.jit
def _capped_exp(log_ratio, cap):
    """(exp(clamp(log_ratio)), 1.0 where the cap is not hit else 0.0)."""
    inside = tl.abs(log_ratio) <= cap
    return tl.exp(_clamp(log_ratio, -cap, cap)), inside.to(tl.float32)


@triton.jit
def _rollout_weight(log_w, lo, hi, cap, MASK: tl.constexpr):
    """exp of the capped log-weight, truncated to [lo, hi] or zeroed outside it (MASK)."""
    w = tl.exp(_clamp(log_w, -cap, cap))
    if MASK:
        # an arithmetic `or`: `|` of two scalar compares fails in the interpreter
        outside = ((w > hi).to(tl.float32) + (w < lo).to(tl.float32)) > 0
        return tl.where(outside, 0.0, w)
    return _clamp(w, lo, hi)


@triton.jit
def _token_rollout(roll_ptr, old, idx, keep, lo, hi, cap, ROLLOUT: tl.constexpr,
                   MASK: tl.constexpr):
    """(u_t = old_t - rollout_t with NaN -> 0, 1.0 where the sampler's log-prob is a number,
    the token's weight (RW_TOKEN and RW_GIVEN; else 1)) over a block of tokens."""
    r = tl.load(roll_ptr + idx, mask=keep, other=0.0).to(tl.float32)
    if ROLLOUT == RW_GIVEN:
        return r * 0.0, r * 0.0 + 1.0, r
    u = old - r
    valid = u == u
    u = tl.where(valid, u, 0.0)
    w = u * 0.0 + 1.0
    if ROLLOUT == RW_TOKEN:
        w = _rollout_weight(u, lo, hi, cap, MASK)
    return u, valid.to(tl.float32), w


@triton.jit
def _sequence_objective(Delta, L, A, v, S_w, eps_low, eps_high, dual_clip, delta, param_pos,
                        param_neg, cap, RATIO: tl.constexpr, TWO_SIDED: tl.constexpr,
                        DUAL: tl.constexpr, OBJECTIVE: tl.constexpr, HAS_DELTA: tl.constexpr):
    """The sequence ratios (trajectory, sequence_mean): one ratio for the whole sequence.
    Returns (its objective in the loss, dL/dlogp_t / norm of every token, J, the statistics'
    terms: clipped, ratio, capped; and for the token pass: CISPO's detached weight xc, the
    ratio x and dx/dlogp_t), zeros (x: 1) for the token-level ratios."""
    obj = 0.0
    g_seq = 0.0
    J_seq = 0.0
    clipped_units = 0.0
    ratio = 0.0
    capped = 0.0
    xc = 1.0
    x_seq = 1.0
    dx_seq = 0.0
    if RATIO == TRAJECTORY or RATIO == SEQUENCE_MEAN:
        nonempty = L > 0
        unit = nonempty.to(tl.float32)
        log_ratio = Delta if RATIO == TRAJECTORY else Delta / tl.maximum(L, 1.0)
        x, chi = _capped_exp(log_ratio, cap)
        J_seq, dJ, clipped, xc = _clipped_objective(x, A, eps_low, eps_high, dual_clip, delta,
                                                    param_pos, param_neg, TWO_SIDED, DUAL,
                                                    OBJECTIVE, HAS_DELTA)
        # dx/dlogp_t: the same for every token (/ L_i for GSPO)
        dx_seq = x * chi
        if RATIO == SEQUENCE_MEAN:
            dx_seq = dx_seq / tl.maximum(L, 1.0)
        x_seq = x
        # an empty sequence adds nothing, not NaN; S_w = L without a sampler correction, else
        # the sum of the tokens' weights (CISPO's objective is summed per token instead)
        obj = tl.where(nonempty, v * S_w * J_seq, 0.0)
        # dL/dlogp_t / norm = -W_i dJ/dx dx/dlogp_t, W_i / norm = v S_w
        g_seq = -v * S_w * dJ * dx_seq
        clipped_units = clipped * unit
        ratio = x * unit
        capped = (1.0 - chi) * unit
    return obj, g_seq, J_seq, clipped_units, ratio, capped, xc, x_seq, dx_seq


@triton.jit
def token_coefficient(lp, zero, old_ptr, ref_ptr, roll_ptr, sel_ptr, idx, keep, A, v, g_seq,
                      J_seq, W_seq, keep_seq, xc_seq, x_seq, dx_seq, kl_seq, eps_low, eps_high,
                      dual_clip, delta, param_pos, param_neg, cap, beta, rw_lo, rw_hi,
                      RATIO: tl.constexpr, TWO_SIDED: tl.constexpr, DUAL: tl.constexpr,
                      KL_IN_LOSS: tl.constexpr, ROLLOUT: tl.constexpr, RW_MASK: tl.constexpr,
                      OBJECTIVE: tl.constexpr, HAS_DELTA: tl.constexpr, KL_BIAS: tl.constexpr,
                      TOP_ENTROPY: tl.constexpr):
    """Tokens ``idx`` (a block, ``zero`` a block of zeros, or one token, ``zero`` 0.0) of
    log-probs ``lp``, those where ``keep``: (c = dL/dlogp / norm, the tokens' terms of the
    objective's sum (0 where not kept), for the token ratio x, chi and clipped, and the KL
    term's k3 as it enters the loss: times the ratio with KL_BIAS, 0 without KL_IN_LOSS). The
    sequence ratios give their sequence's g_seq and J_seq, CISPO's weight xc_seq (VESPO's, at
    every ratio), the ratio x_seq with dx_seq = dx/dlogp_t and the sequence's KL sum kl_seq
    (for KL_BIAS, the KL term times the ratio); keep_seq, 1.0 or 0.0 where the off-policy
    mask drops the sequence's policy objective (its g_seq and J_seq already carry it);
    ``sel_ptr`` the tokens' selection flags (uint8: FLAG_KL_COV, KL-Cov's penalty;
    FLAG_KEPT, kept by the top-entropy quantile, TOP_ENTROPY); the NaN rule: a token whose
    objective is NaN gets a NaN coefficient, whichever branch NaN fell through."""
    c = zero + g_seq
    J_tok = zero + J_seq  # the token's objective, to apply the NaN rule
    wt = zero + W_seq  # the token's sampler weight (the objectives formed per token read it)
    obj = zero
    x = zero
    chi = zero
    clipped = zero
    kx = zero + x_seq  # the ratio KL_BIAS weighs the KL with, and its derivative
    kdx = zero + dx_seq
    kl_term = zero
    if RATIO == TOKEN or RATIO == NO_RATIO or OBJECTIVE == CISPO or OBJECTIVE == GMPO:
        old = lp  # read by the token ratio, GMPO's clip and the sampler's token weights
        if RATIO == TOKEN or ROLLOUT == RW_TOKEN or OBJECTIVE == GMPO:
            old = tl.load(old_ptr + idx, mask=keep, other=0.0).to(tl.float32)
        if ROLLOUT == RW_TOKEN or ROLLOUT == RW_GIVEN:
            _u, _valid, wt = _token_rollout(roll_ptr, old, idx, keep, rw_lo, rw_hi, cap,
                                            ROLLOUT, RW_MASK)
    if OBJECTIVE == VESPO:  # the sampler's weights entered the sequence's weight instead
        wt = zero + 1.0
    wt = wt * keep_seq  # 0 where the off-policy mask drops the sequence's objective
    if TOP_ENTROPY:  # 0 on the tokens below the entropy quantile
        wt = wt * selection_flag(sel_ptr, idx, keep, FLAG_KEPT)
    if RATIO == TOKEN:
        x, chi = _capped_exp(lp - old, cap)
        J_tok, dJ, clipped, xc = _clipped_objective(x, A, eps_low, eps_high, dual_clip, delta,
                                                    param_pos, param_neg, TWO_SIDED, DUAL,
                                                    OBJECTIVE, HAS_DELTA)
        if OBJECTIVE == DPPO_TV or OBJECTIVE == DPPO_KL:
            xc = _dppo_weight(lp, old, x, A, eps_low, eps_high, delta, OBJECTIVE, HAS_DELTA)
            clipped = (xc == 0).to(tl.float32)
        if OBJECTIVE == VESPO:  # the sequence's weight on each token's logp
            xc = zero + xc_seq
        if (OBJECTIVE == CISPO or OBJECTIVE == DPPO_TV or OBJECTIVE == DPPO_KL
                or OBJECTIVE == VESPO):
            J_tok = xc * A * lp  # J = sg(w) A logp
            c = -v * wt * xc * A
        elif OBJECTIVE == DRO:  # J = A logp - dro_beta / 2 (logp - old)^2, uncapped
            d = lp - old
            J_tok = A * lp - 0.5 * param_pos * d * d
            c = -v * wt * (A - param_pos * d)
        elif OBJECTIVE == KL_COV:  # J = x A - coef s |logp - old| (uncapped), s the token's flag
            s = selection_flag(sel_ptr, idx, keep, FLAG_KL_COV)
            d = lp - old
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            J_tok = J_tok - param_pos * s * tl.abs(d)
            c = -v * wt * (dJ * x * chi - param_pos * s * sign)
            clipped = s  # the statistic: the share under the penalty
        else:
            c = -v * wt * dJ * x * chi
        obj = tl.where(keep, v * wt * J_tok, 0.0)
        kx = x
        kdx = x * chi
    elif RATIO == NO_RATIO:
        J_tok = A * lp
        obj = tl.where(keep, v * wt * J_tok, 0.0)
        c = -v * wt * A
    elif OBJECTIVE == CISPO or OBJECTIVE == VESPO:  # a detached weight on each token's logp
        J_tok = xc_seq * A * lp
        obj = tl.where(keep, v * wt * J_tok, 0.0)
        c = -v * wt * xc_seq * A
    elif OBJECTIVE == GMPO:  # the sequence's gradient where the token's log-ratio was not clipped
        _dc, _clipped, active = gmpo_log_ratio(lp - old, A, eps_low, eps_high, TWO_SIDED)
        c = c * active
        kdx = kdx * active
    if KL_IN_LOSS:
        u = tl.load(ref_ptr + idx, mask=keep, other=0.0).to(tl.float32) - lp
        uc = _clamp(u, -cap, cap)
        kl = tl.exp(uc) - uc - 1.0
        dkl = (1.0 - tl.exp(uc)) * (tl.abs(u) <= cap).to(tl.float32)
        if KL_BIAS:  # beta x kl: the ratio's derivative times the unit's KL sum, too
            kl_unit = kl if RATIO == TOKEN else zero + kl_seq
            c += v * beta * (kx * dkl + kdx * kl_unit)
            kl = kx * kl
        else:
            c += v * beta * dkl
        J_tok -= beta * kl
        obj -= tl.where(keep, v * beta * kl, 0.0)
        kl_term = tl.where(keep, kl, 0.0)
    c = tl.where(J_tok != J_tok, float("nan"), c)
    return c, obj, x, chi, clipped, kl_term
