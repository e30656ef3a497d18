"""Which implementation the public functions use: on the CPU without TRITON_INTERPRET the
reference (exactly), with it the Triton kernels; float64 always the reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels import backend
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
    if not backend.BUILT_FOR_INTERPRETER:
        pytest.skip("TRITON_INTERPRET was not set at import (TIC_TEST_NO_INTERPRET=1): the "
                    "kernels are not built for the interpreter; see the subprocess test below")
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


_LATE = textwrap.dedent("""
    import os, sys, warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sys.argv[1] == "after_triton":  # another library imported triton first
            import triton
            os.environ["TRITON_INTERPRET"] = "1"
        import tic_kernels as tk
        from tic_kernels import reference as ref
        os.environ["TRITON_INTERPRET"] = "1"  # after the import, as a notebook cell does
        x, t = torch.randn(3, 5), torch.tensor([0, 4, 2])
        lp = tk.token_logprobs(x, t)
        loss = tk.tic_loss(x, t, torch.randn(3), torch.randn(1),
                           cu_seqlens=torch.tensor([0, 3])).loss
    assert torch.equal(lp, ref.token_logprobs(x, t)), "not the reference path"
    assert torch.isfinite(loss)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "TRITON_INTERPRET=1 is set, but it was not when triton was " \\
        "imported" in said[0], said
    print("OK")
""")


@pytest.mark.parametrize("when", ["after_tic_kernels", "after_triton"])
def test_interpreter_switched_on_after_import_takes_the_reference(when):
    """TRITON_INTERPRET=1 set after ``import tic_kernels``, or after another library imported
    triton, is ignored with one warning that names it (Triton built its kernels for a GPU at
    import), and CPU tensors take the reference, instead of crashing inside Triton ("0 active
    drivers", "Cannot call @triton.jit'd outside of the scope of a kernel")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _LATE, when], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
