"""The objectives of op 4 beyond the clipped surrogate (docs/spec.md, op 4): CISPO, SAPO,
DPPO, DRO, GMPO, VESPO, KL-Cov, the top-entropy token selection, the clipped objective's
upper bound delta, and the KL's bias correction, on every entry point (logits,
log-probabilities, the fused LM head), against the reference and against formulas written
here from TRL's and verl's definitions."""
import math

import pytest
import torch
import torch.nn.functional as F

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.testing import (GRAD_TOL, HEAD_GRAD_TOL, LOSS_TOL, assert_close_to_scale,
                                 head_batch, loss_batch, rollout_keywords, tolerance)

LENGTHS = [3, 0, 6, 1, 5, 4]
OBJECTIVES = {
    "cispo": dict(objective="cispo"),
    "cispo_upper": dict(objective="cispo", clip_mode="upper", eps_high=1.5),
    "sapo": dict(objective="sapo", sapo_tau_pos=0.7, sapo_tau_neg=1.3),
    "delta": dict(objective="clip", delta=1.05),
    "kl_bias": dict(objective="clip", beta=0.2, kl_bias_correction=True),
    "sapo_kl_bias": dict(objective="sapo", beta=0.1, kl_bias_correction=True,
                         entropy_coef=0.03),
    "cispo_kl_entropy": dict(objective="cispo", beta=0.1, entropy_coef=0.02),
    "kl_bias_weights": dict(objective="clip", beta=0.2, kl_bias_correction=True,
                            rollout="weights"),
    "vespo": dict(objective="vespo"),
    "vespo_kl_bias_weights": dict(objective="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5,
                                  beta=0.2, kl_bias_correction=True, rollout="weights"),
}
# cases run at one ratio (DRO: token only; GMPO: sequence_mean only; VESPO and the
# off-policy mask at token-mean, whose chunks must still hold whole sequences)
ONE_RATIO_OBJECTIVES = {
    "dro": dict(objective="dro", dro_beta=0.7),
    "dro_kl_bias": dict(objective="dro", dro_beta=2.5, beta=0.1, kl_bias_correction=True,
                        entropy_coef=0.02),
    "gmpo_kl_bias": dict(objective="gmpo", eps_low=0.1, eps_high=0.1, beta=0.1,
                         kl_bias_correction=True),
    # token-mean, as TRL's: the chunks must still hold whole sequences (phi is theirs)
    "vespo_token": dict(objective="vespo", aggregation="token-mean", vespo_k_pos=1.0,
                        vespo_lambda_pos=0.5),
    "opsm_token": dict(aggregation="token-mean", off_policy_mask_threshold=0.0),
    # every row's log-prob before a gradient: the fused head's pre-pass
    "kl_cov": dict(objective="kl_cov", kl_cov_ratio=0.25, kl_cov_coef=0.6, beta=0.1,
                   entropy_coef=0.02),
    "kl_cov_seq_mean": dict(objective="kl_cov", kl_cov_ratio=0.1,
                            aggregation="seq-mean-token-mean"),
    "top_entropy": dict(top_entropy_quantile=0.4, beta=0.1),
    "top_entropy_kl_cov": dict(objective="kl_cov", kl_cov_ratio=0.2, top_entropy_quantile=0.6,
                               entropy_coef=0.05),
}


def _run(fn, batch, **kw):
    x = batch.logits.clone().requires_grad_(True)
    out = fn(x, batch.targets, batch.old_logprobs, batch.advantages, **batch.layout_kw, **kw)
    out.loss.backward()
    return out, x.grad


def _matches_the_reference(batch, kw):
    """tic_loss on the kernels equals the reference (loss, statistics, gradient); returns the
    reference's LossOutput."""
    out, grad = _run(tk.tic_loss, batch, **kw)
    want, want_grad = _run(ref.tic_loss, batch, **kw)
    torch.testing.assert_close(out.loss, want.loss, **tolerance(LOSS_TOL))
    assert set(out.stats) == set(want.stats)
    for k in want.stats:
        torch.testing.assert_close(out.stats[k], want.stats[k], **tolerance(LOSS_TOL), msg=k)
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, torch.float32))
    return want


def _with_ref(batch, kw):
    kw = dict(kw)
    if kw.get("beta"):
        kw["ref_logprobs"] = batch.ref_logprobs
    if kw.pop("rollout", None):  # the sampler's weights, which the KL term never takes
        kw.update(rollout_keywords(batch.old_logprobs, batch.layout_kw, "weights", seed=5))
    return kw


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("ratio", ["trajectory", "sequence_mean", "token"])
@pytest.mark.parametrize("padded", [False, True])
def test_kernels_match_the_reference(name, ratio, padded, device):
    """tic_loss on the kernels against the reference: loss, statistics, gradient; the batch
    drifts far enough that ratios fall on both sides of every bound (a sequence's ratio sums
    its tokens' drifts: less drift per token there)."""
    seed = list(OBJECTIVES).index(name) * 10 + ["trajectory", "sequence_mean",
                                                 "token"].index(ratio) * 2 + padded
    batch = loss_batch(LENGTHS, 61, padded=padded, device=device,
                       drift=0.4 if ratio == "token" else 0.1, seed=seed)
    kw = _with_ref(batch, dict(ratio=ratio, **OBJECTIVES[name]))
    out, grad = _run(tk.tic_loss, batch, **kw)
    want, want_grad = _run(ref.tic_loss, batch, **kw)
    atol, rtol = LOSS_TOL
    torch.testing.assert_close(out.loss, want.loss, atol=atol, rtol=rtol)
    assert set(out.stats) == set(want.stats)
    for k in want.stats:
        torch.testing.assert_close(out.stats[k], want.stats[k], atol=atol, rtol=rtol, msg=k)
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, torch.float32))
    assert grad.abs().sum() > 0


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("objective, delta", [("dppo_tv", None), ("dppo_tv", 1.2),
                                              ("dppo_kl", None), ("dppo_kl", 1.2),
                                              ("dro", None), ("kl_cov", None)])
@pytest.mark.parametrize("padded", [False, True])
def test_token_objectives_match_the_reference(objective, delta, padded, device):
    """The token ratio's own objectives: DPPO's trust region, bounds that part of the tokens
    pass, with and without the weight's cap; DRO's penalty; with the sampler's weights and
    the KL; KL-Cov's penalty on a share of the tokens."""
    batch = loss_batch(LENGTHS, 7, padded=padded, device=device, drift=0.3, seed=41)
    if objective == "dro":
        kw = dict(dro_beta=1.7)
    elif objective == "kl_cov":
        kw = dict(kl_cov_ratio=0.3, kl_cov_coef=0.8)
    else:
        lo, hi = (0.02, 0.03) if objective == "dppo_tv" else (0.003, 0.005)
        kw = dict(eps_low=lo, eps_high=hi, delta=delta)
    kw.update(ratio="token", objective=objective, ref_logprobs=batch.ref_logprobs, beta=0.05,
              **rollout_keywords(batch.old_logprobs, batch.layout_kw, "token_truncate", seed=42))
    want = _matches_the_reference(batch, kw)
    if objective == "dro":
        assert want.stats["clip_fraction"] == 0  # nothing is clipped
    elif objective == "kl_cov":  # floor(0.3 * 19) of the 19 tokens are penalised
        assert want.stats["clip_fraction"] == pytest.approx(5 / 19)
    else:
        assert 0 < want.stats["clip_fraction"] < 1  # tokens on both sides of the region


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("ratio, objective, mode", [
    ("token", "clip", None), ("token", "cispo", "token_truncate"),
    ("trajectory", "clip", "sequence_mask"), ("sequence_mean", "sapo", "weights"),
    ("token", "vespo", None), ("token", "kl_cov", None), ("none", "clip", None)])
@pytest.mark.parametrize("padded", [False, True])
def test_top_entropy_quantile_matches_the_reference(ratio, objective, mode, padded, device):
    """top_entropy_quantile on the logits (the entropies op 1 computes): loss, statistics and
    gradient against the reference, over the ratios, objectives and sampler corrections; the
    selection changes the loss."""
    batch = loss_batch(LENGTHS, 61, padded=padded, device=device, drift=0.3,
                       seed=53 + padded)
    kw = dict(ratio=ratio, objective=objective, top_entropy_quantile=0.45)
    if objective == "kl_cov":
        kw["kl_cov_ratio"] = 0.3
    if mode is not None:
        kw.update(rollout_keywords(batch.old_logprobs, batch.layout_kw, mode, seed=54))
    want = _matches_the_reference(batch, kw)
    every = ref.tic_loss(batch.logits, batch.targets, batch.old_logprobs, batch.advantages,
                         **batch.layout_kw, **{**kw, "top_entropy_quantile": 1.0})
    assert (want.loss - every.loss).abs() > 1e-6


@pytest.mark.parametrize("keep", [1e-3, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_entropy_selection_is_torch_quantile(n, keep):
    """The kernels' selection (a sort and a lerp on the device) keeps exactly the tokens whose
    entropy is at least torch.quantile's (1 - keep)-quantile, as TRL's get_high_entropy_mask;
    ties and padding included."""
    from tic_kernels.ops.token_selection import entropy_selection
    g = torch.Generator().manual_seed(n)
    H = torch.rand(n + 5, generator=g) * 3
    H[1:3] = H[0]  # ties
    valid = torch.ones(n + 5, dtype=torch.bool)
    valid[torch.randperm(n + 5, generator=g)[:5]] = False  # padding, whatever its value
    threshold = torch.quantile(H[valid], 1.0 - keep)
    want = valid & (H * valid >= threshold)
    assert torch.equal(entropy_selection(H, valid, keep).bool(), want)


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("share", [0.3, 0.999])
@pytest.mark.parametrize("padded", [False, True])
def test_covariance_selection_on_the_device(padded, share, device):
    """KL-Cov's flags, as the kernels select them over the flat positions of either layout,
    are the reference's covariance_selection over the loss tokens: a tie of 7 tokens across
    the boundary goes to the earlier ones, an empty sequence's NaN advantage changes nothing,
    positions off the loss tokens are never flagged."""
    from tic_kernels.backend import kernel_segments
    from tic_kernels.config import LossConfig
    from tic_kernels.ops.ratio_objectives import FLAG_KL_COV
    from tic_kernels.ops.token_selection import token_flags
    from tic_kernels.reference.loss import covariance_selection
    lengths = [5, 0, 7, 3, 1]
    b = loss_batch(lengths, 11, padded=padded, seed=61, device=device)
    g = torch.Generator().manual_seed(62)
    logp = torch.randn(b.targets.shape, generator=g).to(device)
    adv = b.advantages.clone()
    adv[1], adv[2] = float("nan"), adv.abs().max() + 1  # the empty one; the largest
    if padded:
        logp[2] = 2.0  # the largest advantage at a high log-prob: 7 tied, largest covariances
        valid = b.layout_kw["mask"].reshape(-1)
        A = adv[:, None].expand(b.targets.shape).reshape(-1)
        mask, T = valid, b.targets.shape[1]
    else:
        logp[5:12] = 2.0
        valid = torch.ones(logp.numel(), dtype=torch.bool, device=device)
        A = adv.repeat_interleave(torch.tensor(lengths, device=device))
        mask, T = None, 0
    config = LossConfig(ratio="token", objective="kl_cov", kl_cov_ratio=share)
    cu, _, _ = kernel_segments(b.layout_kw.get("cu_seqlens"), b.layout_kw.get("mask"))
    flags = token_flags(config, logp, None, adv, cu, mask, T).reshape(-1)
    want = covariance_selection(logp.reshape(-1)[valid], A[valid], share)
    assert torch.equal((flags[valid] & FLAG_KL_COV.value) != 0, want)
    assert int(want.sum()) == max(1, int(16 * share))
    assert not flags[~valid].any()


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("share, chosen", [(0.0002, [0, 1]), (1e-315, [0]), (5e-324, [0])])
def test_covariance_selection_counts_in_float64(share, chosen, device):
    """KL-Cov penalises max(1, floor(share N)) tokens computed in float64, as verl's Python
    does: 10000 tokens at verl's default share 0.0002 are 2 (in float32, 1.99999995: 1); a
    subnormal share, 1."""
    from tic_kernels.config import LossConfig
    from tic_kernels.ops.token_selection import token_flags
    N = 10000
    logp = torch.randn(N, generator=torch.Generator().manual_seed(63)).to(device)
    config = LossConfig(ratio="token", objective="kl_cov", kl_cov_ratio=share)
    cu = torch.tensor([0, N], device=device)
    A = torch.full((1,), 0.3, device=device)  # its mean over the tokens is itself, exactly
    flags = token_flags(config, logp, None, A, cu, None, 0)
    assert flags.nonzero().reshape(-1).tolist() == chosen  # every covariance 0: a tie


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("case", ["two_sided", "upper", "kl_bias_weights", "kl_entropy"])
@pytest.mark.parametrize("padded", [False, True])
def test_gmpo_matches_the_reference(case, padded, device):
    """GMPO (sequence_mean of the tokens' log-ratios, each clipped on its advantage's side):
    log-ratio bounds that part of the tokens pass, the upper-only clip, the KL (with its bias
    correction and the sampler's weights) and the entropy bonus."""
    batch = loss_batch(LENGTHS, 29, padded=padded, device=device, drift=0.4, seed=51 + padded)
    kw = dict(ratio="sequence_mean", objective="gmpo", eps_low=0.3, eps_high=0.25)
    if case == "upper":
        kw.update(clip_mode="upper", eps_high=0.05)
    elif case == "kl_bias_weights":
        kw.update(beta=0.2, kl_bias_correction=True, rollout="weights")
    elif case == "kl_entropy":
        kw.update(beta=0.1, entropy_coef=0.03)
    kw = _with_ref(batch, kw)
    want = _matches_the_reference(batch, kw)
    assert 0 < want.stats["clip_fraction"] < 1  # tokens on both sides of the bounds


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("ratio, objective", [("token", "clip"), ("trajectory", "clip"),
                                              ("token", "vespo"), ("sequence_mean", "gmpo")])
@pytest.mark.parametrize("mode", [None, "token_truncate", "sequence_mask", "weights"])
def test_off_policy_mask_matches_the_reference(ratio, objective, mode, device):
    """The off-policy sequence mask against the sampler's log-probs (old ones without them, or
    with given weights), at a threshold that drops some of the negative-advantage sequences
    and keeps others; padded, with the KL (which the mask leaves alone)."""
    batch = loss_batch(LENGTHS, 23, padded=True, device=device, drift=0.4, seed=61)
    kw = dict(ratio=ratio, objective=objective, ref_logprobs=batch.ref_logprobs, beta=0.1)
    if mode:
        kw.update(rollout_keywords(batch.old_logprobs, batch.layout_kw, mode, seed=62))
    if mode == "weights":  # none 0: a dropped sequence must have had an objective
        kw["rollout_weights"] = kw["rollout_weights"] + 0.1
    # the threshold: the median drift of the sequences with A < 0
    rows = batch.layout_kw["mask"]
    base = kw.get("rollout_logprobs", batch.old_logprobs)
    with torch.no_grad():
        logp = ref.token_logprobs(batch.logits, torch.where(rows, batch.targets, -100))
        t = torch.where(rows, (base - logp).nan_to_num(0.0), 0.0)
        drift = t.sum(-1) / rows.sum(-1).clamp(min=1)
    negative = (batch.advantages < 0) & rows.any(-1)
    threshold = float(drift[negative].median())
    assert (drift[negative] > threshold).any() and (drift[negative] <= threshold).any()
    kw["off_policy_mask_threshold"] = threshold
    want = _matches_the_reference(batch, kw)
    unmasked, _ = _run(ref.tic_loss, batch, **{**kw, "off_policy_mask_threshold": None})
    assert (unmasked.loss - want.loss).abs() > 1e-6  # the mask dropped something


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("objective", ["cispo", "sapo", "dro", "vespo"])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask", "weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampler_correction_and_dtypes(objective, mode, dtype, device):
    batch = loss_batch(LENGTHS, 97, dtype=dtype, device=device, drift=0.3, seed=7)
    kw = dict(ratio="trajectory", objective=objective,
              **rollout_keywords(batch.old_logprobs, batch.layout_kw, mode, seed=8))
    if objective == "dro":
        kw.update(ratio="token", dro_beta=0.9)
    out, grad = _run(tk.tic_loss, batch, **kw)
    want, want_grad = _run(ref.tic_loss, batch, **kw)
    torch.testing.assert_close(out.loss, want.loss, **tolerance(LOSS_TOL))
    torch.testing.assert_close(grad, want_grad, **tolerance(GRAD_TOL, dtype))


def _token_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    logp = (-torch.rand(B, T, generator=g) * 3).double()
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    refp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    return logp, old, refp, adv, mask


def _grpo_mean(per_token, mask):
    """TRL's grpo / sapo normaliser: mean over rows of each row's masked token mean."""
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


@pytest.mark.parametrize("case", ["trl_cispo", "verl_cispo", "sapo", "delta", "kl_bias",
                                  "dppo_tv", "dppo_kl", "dro", "vespo", "opsm", "kl_cov",
                                  "top_entropy"])
def test_token_level_formulas(case, device, path):
    """The token ratio's objectives against formulas written from TRL's and verl's losses
    (GRPOTrainer._compute_loss, core_algos): value and gradient w.r.t. the log-probs, on the
    path under test (kernels or reference)."""
    logp, old, refp, adv, mask = _token_tensors(seed=11)
    x = logp.clone().requires_grad_()
    r = torch.exp(x - old)
    A = adv[:, None]
    kw = dict(ratio="token", aggregation="seq-mean-token-mean")
    if case == "trl_cispo":  # TRL: clamp(r, max=epsilon_high).detach() * A * logp
        per_token = -torch.clamp(r, max=5.0).detach() * A * x
        kw.update(objective="cispo", clip_mode="upper", eps_high=4.0)
    elif case == "verl_cispo":  # verl: clamp(r, 1 - low, 1 + high).detach() * A * logp
        per_token = -torch.clamp(r, 0.8, 1.28).detach() * A * x
        kw.update(objective="cispo")
    elif case == "sapo":  # sigmoid(tau (r - 1)) * 4 / tau * A, tau by the sign of A
        tau = torch.where(A > 0, 1.0, 1.05)
        per_token = -torch.sigmoid(tau * (r - 1)) * 4 / tau * A
        kw.update(objective="sapo")
    elif case == "delta":  # TRL: coef_1 clamped above by delta in the unclipped branch
        coef_2 = torch.clamp(r, 0.8, 1.28)
        per_token = -torch.min(torch.clamp(r, max=1.1) * A, coef_2 * A)
        kw.update(delta=1.1)
    elif case.startswith("dppo"):  # verl: -A sg(min(r, c)) logp inside the trust region
        p, p_old = x.detach().exp(), old.exp()
        if case == "dppo_tv":
            valid = torch.where(A > 0, p - p_old <= 0.28, p - p_old >= -0.2)
        else:
            bkl = p_old * (old - x.detach()) + (1 - p_old) * torch.log(
                (1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            valid = torch.where(A > 0, (bkl <= 0.28) | (p <= p_old), (bkl <= 0.2) | (p >= p_old))
        per_token = -A * torch.clamp(r, max=1.5).detach() * x * valid
        kw.update(objective=case, delta=1.5)
    elif case == "dro":  # verl: -(logp A - beta / 2 (logp - old)^2)
        per_token = -(x * A - 0.5 * 1.3 * (x - old) ** 2)
        kw.update(objective="dro", dro_beta=1.3)
    elif case == "kl_cov":  # verl: -A r, + coef |logp - old| on the top-k covariance tokens
        with torch.no_grad():
            A_tok, lp_tok = A.expand_as(x)[mask], x[mask]
            cov = (A_tok - A_tok.mean()) * (lp_tok - lp_tok.mean())
            k = max(1, int(cov.numel() * 0.2))
            top = torch.zeros_like(cov, dtype=torch.bool)
            top[torch.topk(cov, k).indices] = True
            chosen = torch.zeros_like(mask)
            chosen[mask] = top
        per_token = -A * r + 0.9 * chosen * (x - old).abs()
        kw.update(objective="kl_cov", kl_cov_ratio=0.2, kl_cov_coef=0.9)
    elif case == "top_entropy":  # TRL: the policy term times get_high_entropy_mask's tokens
        H = torch.rand(mask.shape, generator=torch.Generator().manual_seed(12)) * 2
        keep = (H * mask >= torch.quantile(H[mask].float(), 1 - 0.35)) & mask
        per_token = -torch.min(r * A, torch.clamp(r, 0.8, 1.28) * A) * keep
        kw.update(top_entropy_quantile=0.35, entropy=H)
    elif case == "vespo":  # TRL: -phi(w) A logp, phi of the sequence's clamped log-weight
        with torch.no_grad():
            log_w = ((x - old).clamp(-20, 20) * mask).sum(-1, keepdim=True)
            log_w = log_w.clamp(math.log(1e-8), 20.0)
            k = torch.where(A >= 0, 2.5, 1.0)
            lam = torch.where(A >= 0, 0.5, 4.0)
            phi = torch.exp(lam + k * log_w - lam * log_w.exp())
        per_token = -phi * A * x
        kw.update(objective="vespo", vespo_k_pos=2.5, vespo_lambda_pos=0.5, vespo_k_neg=1.0,
                  vespo_lambda_neg=4.0)
    elif case == "opsm":  # TRL: keep = (A >= 0) | (mean_t (old - sg(logp)) <= threshold)
        m = mask.double()
        drift = ((old - x.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        adv[0] = -adv[0].abs()  # a negative advantage, dropped at the threshold below
        threshold = float(drift[0]) - 1e-3
        keep = (A >= 0) | (drift <= threshold)
        per_token = -torch.min(r * A, torch.clamp(r, 0.8, 1.28) * A) * keep
        kw.update(off_policy_mask_threshold=threshold)
    else:  # TRL: per_token_kl * coef_1, then + beta * kl
        coef_2 = torch.clamp(r, 0.8, 1.28)
        kl = torch.exp(refp - x) - (refp - x) - 1
        per_token = -torch.min(r * A, coef_2 * A) + 0.3 * kl * r
        kw.update(beta=0.3, kl_bias_correction=True, ref_logprobs=refp.float())
    want = _grpo_mean(per_token, mask)
    want_grad, = torch.autograd.grad(want, x)
    lp = logp.float().to(device).requires_grad_()
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    out = tk.tic_loss_from_logprobs(lp, old.float().to(device), adv.float().to(device),
                                    mask=mask.to(device), **kw)
    grad, = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(out.loss.double().cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), want_grad * mask, atol=1e-6, rtol=1e-4)


def test_gmpo_formula(device, path):
    """GMPO against the formula written from the paper's and verl's geo_mean: the sign of A
    picks the side each token's log-ratio is clipped on, exp of their masked mean times A,
    averaged over the rows; value and gradient on the path under test."""
    logp, old, _, adv, mask = _token_tensors(seed=13)
    adv[1] = 0.0  # a zero advantage: sign 0, log-ratios 0, no gradient
    x = logp.clone().requires_grad_()
    d = x - old
    sgn = torch.sign(adv)[:, None]
    d_min = sgn * torch.min(sgn * d, sgn * d.clamp(-0.3, 0.2))
    m = mask.double()
    ratio = torch.exp((d_min * m).sum(-1) / m.sum(-1))
    want = (-adv * ratio).mean()
    want_grad, = torch.autograd.grad(want, x)
    lp = logp.float().to(device).requires_grad_()
    out = tk.tic_loss_from_logprobs(lp, old.float().to(device), adv.float().to(device),
                                    mask=mask.to(device), ratio="sequence_mean",
                                    objective="gmpo", eps_low=0.3, eps_high=0.2,
                                    aggregation="seq-mean-token-mean", num_sequences=4)
    grad, = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(out.loss.double().cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), want_grad * mask, atol=1e-6, rtol=1e-4)
    assert (grad[1] == 0).all() and (want_grad * mask).abs().sum() > 0


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("name, ratio", [("cispo", "token"), ("sapo", "trajectory"),
                                         ("kl_bias", "sequence_mean"), ("delta", "token"),
                                         ("dro_kl_bias", "token"),
                                         ("gmpo_kl_bias", "sequence_mean"),
                                         ("vespo_token", "token"), ("opsm_token", "token"),
                                         ("kl_cov", "token"), ("kl_cov_seq_mean", "token"),
                                         ("top_entropy", "trajectory"),
                                         ("top_entropy_kl_cov", "token")])
@pytest.mark.parametrize("chunk_size", [4, 64])
def test_fused_lm_head(name, ratio, chunk_size, device):
    """linear_tic_loss with the objectives (chunks of 4 rows cut sequences: rows-equal for
    the token ratio, whole sequences in pieces for the others) against float64 logits."""
    batch = head_batch(LENGTHS, 53, device=device, seed=21)
    kw = dict(ratio=ratio, **{**OBJECTIVES, **ONE_RATIO_OBJECTIVES}[name])
    if kw.get("beta"):
        kw["ref_logprobs"] = batch.ref_logprobs
    leaves = [t.clone().requires_grad_() for t in (batch.hidden, batch.weight)]
    out = tk.linear_tic_loss(leaves[0], leaves[1], batch.targets, batch.old_logprobs,
                             batch.advantages, chunk_size=chunk_size, **batch.layout_kw, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    h64, w64 = (t.detach().double().requires_grad_() for t in (batch.hidden, batch.weight))
    want = ref.tic_loss(F.linear(h64, w64), batch.targets, batch.old_logprobs.double(),
                        batch.advantages.double(), **batch.layout_kw,
                        **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    want_grads = torch.autograd.grad(want.loss, (h64, w64))
    torch.testing.assert_close(out.loss.double(), want.loss, **tolerance(LOSS_TOL))
    for name_, g, w in zip(("hidden", "weight"), grads, want_grads):
        assert_close_to_scale(g, w, HEAD_GRAD_TOL[torch.float32], name_)


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("objective", ["cispo", "sapo", "dro", "vespo"])
def test_nan_rule(objective, device):
    """A NaN log-probability gives its own token (token ratio) or sequence (trajectory) a
    NaN gradient, and no other token one (VESPO: its weight of a NaN log-weight is 0, as
    TRL's, so only the token itself)."""
    batch = loss_batch([4, 5], 11, device=device, seed=31)
    lp = torch.randn(9, device=device).clamp(max=-0.1)
    lp[6] = float("nan")
    kw = dict(dro_beta=0.5) if objective == "dro" else {}
    for ratio, bad in (("token", [6]), ("trajectory", list(range(4, 9)))):
        if objective == "dro" and ratio != "token":
            continue
        if objective == "vespo":
            bad = [6]
        x = lp.clone().requires_grad_()
        out = tk.tic_loss_from_logprobs(x, batch.old_logprobs, batch.advantages,
                                        ratio=ratio, objective=objective, **batch.layout_kw,
                                        **kw)
        g, = torch.autograd.grad(out.loss, x)
        assert torch.isnan(g[bad]).all() and not torch.isnan(g[[i for i in range(9)
                                                                 if i not in bad]]).any()


@pytest.mark.usefixtures("requires_triton")
@pytest.mark.parametrize("clip_mode", ["two_sided", "upper"])
def test_gmpo_nan_rule(clip_mode, device):
    """GMPO with a NaN log-probability: its sequence's gradient is NaN (one ratio per
    sequence), no other token's, and the clip statistic stays a number, as the reference's."""
    batch = loss_batch([4, 5], 11, device=device, seed=33)
    adv = torch.tensor([0.7, -0.9], device=device)  # both sides of the clip
    lp = torch.randn(9, device=device).clamp(max=-0.1)
    lp[6] = float("nan")
    kw = dict(ratio="sequence_mean", objective="gmpo", clip_mode=clip_mode, **batch.layout_kw)
    stats = []
    for fn in (tk.tic_loss_from_logprobs, ref.tic_loss_from_logprobs):
        x = lp.clone().requires_grad_()
        out = fn(x, batch.old_logprobs, adv, **kw)
        g, = torch.autograd.grad(out.loss, x)
        assert torch.isnan(g[4:]).all() and not torch.isnan(g[:4]).any()
        stats.append(out.stats["clip_fraction"])
    assert torch.isfinite(stats[0]) and torch.isfinite(stats[1])
    torch.testing.assert_close(stats[0], stats[1].to(stats[0].dtype))


@pytest.mark.parametrize("kw, match", [
    (dict(objective="bogus"), "objective='bogus' is not supported"),
    (dict(objective="cispo", ratio="none"), "ratio='none' has none"),
    (dict(objective="sapo", delta=1.5), "delta bounds the clipped objective"),
    (dict(delta=0.0), "delta .* must be a finite number > 0"),
    (dict(delta=float("nan")), "delta .* must be a finite number > 0"),
    (dict(objective="cispo", dual_clip=3.0), "dual_clip applies to objective='clip'"),
    (dict(objective="dppo_kl"), "it takes ratio='token', not 'trajectory'"),
    (dict(ratio="none", delta=2.0), "delta bounds a ratio; ratio='none' has none"),
    (dict(kl_bias_correction=True), "it needs beta > 0"),
    (dict(ratio="none", kl_bias_correction=True, beta=0.1, ref_logprobs=torch.zeros(3)),
     "ratio='none' has none"),
    (dict(objective="sapo", sapo_tau_neg=0.0), "sapo_tau_neg .* must be a finite number > 0"),
    (dict(kl_bias_correction=1), "kl_bias_correction must be True or False"),
    (dict(objective="dro", ratio="token"), "dro_beta .* must be a finite number > 0"),
    (dict(objective="dro", ratio="token", dro_beta=-1.0), "dro_beta .* finite number > 0"),
    (dict(objective="dro", dro_beta=1.0), "it takes ratio='token', not 'trajectory'"),
    (dict(dro_beta=1.0), "dro_beta is DRO's penalty: it needs objective='dro'"),
    (dict(objective="dro", ratio="token", dro_beta=1.0, delta=2.0),
     "objective='dro' has no such branch"),
    (dict(objective="gmpo", ratio="token"), "it takes ratio='sequence_mean', not 'token'"),
    (dict(objective="vespo", vespo_k_neg=-1.0), "vespo_k_neg .* must be a finite number >= 0"),
    (dict(objective="vespo", vespo_lambda_pos=float("inf")), "vespo_lambda_pos .* finite"),
    (dict(objective="vespo", ratio="none"), "ratio='none' has none"),
    (dict(objective="vespo", delta=2.0), "objective='vespo' has no such branch"),
    (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold must be a finite"),
    (dict(objective="kl_cov"), "it takes ratio='token', not 'trajectory'"),
    (dict(objective="kl_cov", ratio="token", kl_cov_ratio=0.0), r"kl_cov_ratio .* in \(0, 1\]"),
    (dict(objective="kl_cov", ratio="token", kl_cov_ratio=1.5), r"kl_cov_ratio .* in \(0, 1\]"),
    (dict(objective="kl_cov", ratio="token", kl_cov_coef=-1.0), "kl_cov_coef must be a finite"),
    (dict(kl_cov_ratio=0.1), "kl_cov_ratio belongs to KL-Cov's penalty: it needs"),
    (dict(objective="kl_cov", ratio="token", dual_clip=3.0), "dual_clip applies to"),
    (dict(top_entropy_quantile=0.0, entropy=torch.ones(3)),
     r"top_entropy_quantile .* must be a number in \(0, 1\]"),
    (dict(top_entropy_quantile=1.5), r"top_entropy_quantile .* in \(0, 1\]"),
    (dict(top_entropy_quantile="0.5"), r"top_entropy_quantile .* in \(0, 1\]"),
    (dict(top_entropy_quantile=0.5), "pass it .* exactly when top_entropy_quantile < 1"),
    (dict(entropy=torch.ones(3)), "pass it .* exactly when top_entropy_quantile < 1"),
    (dict(top_entropy_quantile=0.5, entropy=torch.ones(4)), "entropy has shape"),
    (dict(top_entropy_quantile=0.5, entropy=torch.ones(3, dtype=torch.int64)), "entropy"),
    (dict(off_policy_mask_threshold="0.1"), "off_policy_mask_threshold must be a finite"),
    (dict(objective="gmpo", ratio="sequence_mean", dual_clip=3.0),
     "dual_clip applies to objective='clip'"),
])
def test_errors(kw, match):
    lp = torch.tensor([-1.0, -2.0, -0.5])
    with pytest.raises((ValueError, TypeError), match=match):
        tk.tic_loss_from_logprobs(lp, lp - 0.1, torch.ones(1),
                                  cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), **kw)
