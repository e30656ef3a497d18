"""Which implementation the public functions use: on the CPU without TRITON_INTERPRET the
reference (exactly), with it the Triton kernels; float64 always the reference."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.backend import use_triton
from tic_kernels.testing import loss_batch


def _calls(batch):
    logp = torch.randn(batch.targets.shape)
    return {
        "token_logprobs": (lambda m: m.token_logprobs(batch.logits, batch.targets, temperature=0.9)
                           if m is tk else m.token_logprobs(batch.logits, batch.targets, 0.9)),
        "sequence_logprobs": lambda m: m.sequence_logprobs(logp, reduce="mean", **batch.layout_kw),
        "group_advantages": lambda m: m.group_advantages(batch.advantages, 2),
        "tic_loss": lambda m: m.tic_loss(batch.logits, batch.targets, batch.old_logprobs,
                                         batch.advantages, entropy_coef=0.1,
                                         **batch.layout_kw).loss,
        "tic_loss_from_logprobs": lambda m: m.tic_loss_from_logprobs(
            logp, batch.old_logprobs, batch.advantages, **batch.layout_kw).loss,
    }


@pytest.mark.parametrize("name", ["token_logprobs", "sequence_logprobs", "group_advantages",
                                  "tic_loss", "tic_loss_from_logprobs"])
def test_cpu_without_interpreter_is_the_reference(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    batch = loss_batch([3, 0, 4, 2], 23)
    assert not use_triton(batch.logits)
    call = _calls(batch)[name]
    assert torch.equal(call(tk), call(ref))


def test_interpreter_and_float64_routing(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x) and not use_triton(x.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)
    # float64 runs the reference, in float64, through the public API
    logits = torch.randn(4, 9, dtype=torch.float64)
    t = torch.randint(0, 9, (4,))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lp = tk.token_logprobs(logits, t)
    assert lp.dtype == torch.float64
    assert torch.equal(lp, ref.token_logprobs(logits, t))
