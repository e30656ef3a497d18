"""Cross-checks against the peers' own code where their options coincide with ours (the peers
are optional: each test is skipped when its package does not import).

- Liger-Kernel's Triton GRPO loss: token level with loss_type="dapo" is our ratio="token"
  (token-mean); sequence level with loss_type="grpo" is GSPO, our ratio="sequence_mean"
  (seq-mean-token-mean); at token level its cispo (a raw cap on the ratio), sapo, vespo,
  delta, bias-corrected KL and vLLM importance weights are our objectives and options. Its
  kernels run under the Triton interpreter on the CPU.
- TRL's selective_log_softmax is our token_logprobs.
"""
import pytest
import torch

import tic_kernels as tk
from tic_kernels.testing import loss_batch


@pytest.mark.parametrize("level,loss_type,ratio", [("token", "dapo", "token"),
                                                   ("sequence", "grpo", "sequence_mean")])
@pytest.mark.parametrize("eps", [(0.2, 0.28), (3e-4, 4e-4)])
def test_liger_grpo_loss(level, loss_type, ratio, eps, device):
    from tic_kernels.backend import interpreting
    if device == "cpu" and not interpreting():
        pytest.skip("Liger's Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    b = loss_batch([5, 3, 7, 6], 50, padded=True, drift=0.2, seed=1, device=device)
    mask = b.layout_kw["mask"]
    logits, old = torch.nan_to_num(b.logits), torch.nan_to_num(b.old_logprobs)
    targets = b.targets.clamp(min=0)
    # Liger takes (B, T + 1, V) logits and drops the last position
    x = torch.cat([logits, logits[:, :1]], 1).requires_grad_(True)
    theirs, _ = liger.triton_grpo_loss(x, old, None, targets, b.advantages, mask.int(),
                                       temperature=1.0, beta=0.0, eps_low=eps[0], eps_high=eps[1],
                                       inplace=False, loss_type=loss_type,
                                       importance_sampling_level=level, reduce=True)
    theirs.backward()
    y = logits.clone().requires_grad_(True)
    ours = tk.tic_loss(y, targets, old, b.advantages, mask=mask, ratio=ratio,
                       eps_low=eps[0], eps_high=eps[1])
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y.grad, x.grad[:, :-1], atol=1e-7, rtol=1e-5)


# Liger's loss_type and keywords -> ours (its cispo's eps_high is the raw cap on the ratio)
LIGER_CASES = {
    "cispo": (dict(loss_type="cispo", eps_high=1.3),
              dict(objective="cispo", clip_mode="upper", eps_high=0.3,
                   aggregation="token-mean")),
    "sapo": (dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
             dict(objective="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3,
                  aggregation="seq-mean-token-mean")),
    "vespo": (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5,
                   vespo_lambda_neg=1.5),
              dict(objective="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5,
                   vespo_lambda_neg=1.5, aggregation="token-mean")),
    "delta": (dict(loss_type="dapo", eps_low=0.2, eps_high=0.28, delta=1.1),
              dict(delta=1.1, aggregation="token-mean")),
    "bias_corrected_kl": (dict(loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.1,
                               use_bias_correction_kl=True),
                          dict(beta=0.1, kl_bias_correction=True, aggregation="token-mean")),
    "cispo_vllm_weights": (dict(loss_type="cispo", eps_high=1.3, weights=True),
                           dict(objective="cispo", clip_mode="upper", eps_high=0.3,
                                aggregation="token-mean", weights=True)),
}


@pytest.mark.parametrize("case", list(LIGER_CASES))
def test_liger_grpo_loss_objectives(case, device):
    """Liger's token-level objectives against ours on the same batch: loss and logits
    gradient (the ratio drifts far enough that its caps and gates bind)."""
    from tic_kernels.backend import interpreting
    if device == "cpu" and not interpreting():
        pytest.skip("Liger's Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    liger = pytest.importorskip("liger_kernel.transformers.grpo_loss")
    theirs_kw, ours_kw = (dict(d) for d in LIGER_CASES[case])
    b = loss_batch([5, 3, 7, 6], 50, padded=True, drift=0.4, seed=2, device=device)
    mask = b.layout_kw["mask"]
    logits, old = torch.nan_to_num(b.logits), torch.nan_to_num(b.old_logprobs)
    ref = torch.nan_to_num(b.ref_logprobs)
    targets = b.targets.clamp(min=0)
    if theirs_kw.pop("weights", False):
        g = torch.Generator().manual_seed(3)
        weights = (torch.rand(mask.shape, generator=g) * 1.5 + 0.2).to(device)
        theirs_kw["vllm_is_ratio"] = weights
        ours_kw.pop("weights")
        ours_kw["rollout_weights"] = weights
    if ours_kw.get("beta"):
        ours_kw["ref_logprobs"] = ref
    x = torch.cat([logits, logits[:, :1]], 1).requires_grad_(True)
    theirs, _ = liger.triton_grpo_loss(x, old, ref, targets, b.advantages, mask.int(),
                                       temperature=1.0, beta=theirs_kw.pop("beta", 0.0),
                                       inplace=False, importance_sampling_level="token",
                                       reduce=True, **theirs_kw)
    theirs.backward()
    y = logits.clone().requires_grad_(True)
    ours = tk.tic_loss(y, targets, old, b.advantages, mask=mask, ratio="token", **ours_kw)
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y.grad, x.grad[:, :-1], atol=1e-7, rtol=1e-5)
    assert y.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax(temperature, device):
    utils = pytest.importorskip("trl.trainer.utils")
    logits = torch.randn(3, 9, 301, device=device)
    targets = torch.randint(0, 301, (3, 9), device=device)
    theirs = utils.selective_log_softmax(logits / temperature, targets)
    ours = tk.token_logprobs(logits, targets, temperature=temperature)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
