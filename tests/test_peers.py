"""Cross-checks against the peers' own code where their options coincide with ours (the peers
are optional: each test is skipped when its package does not import).

- Liger-Kernel's Triton GRPO loss: token level with loss_type="dapo" is our ratio="token"
  (token-mean); sequence level with loss_type="grpo" is GSPO, our ratio="sequence_mean"
  (seq-mean-token-mean). Its kernels run under the Triton interpreter on the CPU.
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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax(temperature, device):
    utils = pytest.importorskip("trl.trainer.utils")
    logits = torch.randn(3, 9, 301, device=device)
    targets = torch.randint(0, 301, (3, 9), device=device)
    theirs = utils.selective_log_softmax(logits / temperature, targets)
    ours = tk.token_logprobs(logits, targets, temperature=temperature)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
