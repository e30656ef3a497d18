"""Fused token_logprobs (Triton; the interpreter on CPU) against the reference."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.backend import use_triton
from tic_kernels.ops.token_logprobs import token_logprobs_bwd, token_logprobs_fwd
from tic_kernels.testing import GRAD_TOL, VALUE_TOL, entropy_tolerance, tolerance

pytestmark = pytest.mark.usefixtures("requires_triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _both(logits, targets, g, gH, **kw):
    """(logp, entropy, grad) from the fused path and from the reference, same inputs."""
    out = []
    for fn in (tk.token_logprobs, None):
        x = logits.clone().requires_grad_(True)
        if fn is None:
            lp, H = ref.token_logprobs(x, targets, kw.get("temperature", 1.0),
                                       kw.get("ignore_index", -100), True)
        else:
            lp, H = fn(x, targets, return_entropy=True, **kw)
        (lp * g + H * gH).sum().backward()
        out.append((lp, H, x.grad))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [7, 50257, 16384])  # tiny and odd, unaligned, a block multiple
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
def test_matches_reference(dtype, V, target_dtype, device):
    assert use_triton(torch.empty(1, device=device))
    N = 5
    logits = (torch.randn(N, V, device=device) * 3).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, dtype=target_dtype)
    targets[1] = -100
    g, gH = torch.randn(N, device=device), torch.randn(N, device=device)
    (lp, H, gx), (lp_r, H_r, gx_r) = _both(logits, targets, g, gH, temperature=0.7)
    assert lp.dtype == torch.float32 and gx.dtype == dtype
    torch.testing.assert_close(lp, lp_r, **tolerance(VALUE_TOL, dtype))
    torch.testing.assert_close(H, H_r, **entropy_tolerance(V))
    torch.testing.assert_close(gx, gx_r, **tolerance(GRAD_TOL, dtype))
    assert (lp[1] == 0) and (H[1] == 0) and (gx[1] == 0).all()


def test_one_token_and_strided_3d(device):
    full = torch.randn(2, 4, 37, device=device)
    logits = full[:, 1:]  # (2, 3, 37) rows not viewable as 2-D
    targets = torch.randint(0, 37, (2, 3), device=device)
    torch.testing.assert_close(tk.token_logprobs(logits, targets), ref.token_logprobs(logits, targets),
                               **tolerance(VALUE_TOL, torch.float32))
    one = torch.randn(1, 37, device=device)
    t1 = torch.tensor([36], device=device)
    torch.testing.assert_close(tk.token_logprobs(one, t1), ref.token_logprobs(one, t1))
    # a single row given as (V,) with a 0-d target
    assert tk.token_logprobs(one[0], t1[0]).shape == ()


def test_ignored_rows_are_not_read(device):
    logits = torch.randn(4, 40, device=device)
    logits[2] = float("nan")
    targets = torch.tensor([3, 1, -100, 39], device=device)
    x = logits.clone().requires_grad_(True)
    lp, H = tk.token_logprobs(x, targets, return_entropy=True)
    (lp.sum() + H.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(H).all()
    assert (x.grad[2] == 0).all() and torch.isfinite(x.grad).all()


def test_bf16_gradient_meets_flash_attn_rule(device):
    """Error of the bf16 gradient against an fp32 reference is at most 2x that of plain
    PyTorch autograd run in bf16."""
    N, V = 6, 4099
    logits32 = torch.randn(N, V, device=device) * 4
    logits = logits32.to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    x_ref = logits.float().requires_grad_(True)
    (ref.token_logprobs(x_ref, targets) * g).sum().backward()
    x_ours = logits.clone().requires_grad_(True)
    (tk.token_logprobs(x_ours, targets) * g).sum().backward()
    x_torch = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(x_torch, -1).gather(-1, targets[:, None]).squeeze(-1)
    (lp * g.to(torch.bfloat16)).sum().backward()
    err_ours = (x_ours.grad.float() - x_ref.grad).abs().max()
    err_torch = (x_torch.grad.float() - x_ref.grad).abs().max()
    assert err_ours <= 2 * err_torch, (err_ours, err_torch)


def test_bitwise_deterministic(device):
    logits = torch.randn(6, 5000, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, 5000, (6,), device=device)
    runs = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        lp, H = tk.token_logprobs(x, targets, return_entropy=True, temperature=1.3)
        (lp.sum() + 0.5 * H.sum()).backward()
        runs.append((lp, H, x.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck(device):
    x = torch.randn(5, 33, device=device, requires_grad=True)
    t = torch.randint(0, 33, (5,), device=device)
    t[0] = -100
    torch.library.opcheck(token_logprobs_fwd, (x, t, 0.9, -100, True))
    _, max_logsum, H = token_logprobs_fwd(x.detach(), t, 0.9, -100, True)
    torch.library.opcheck(token_logprobs_bwd, (x.detach(), torch.empty_like(x), t, max_logsum, H,
                                               torch.randn(5, device=device),
                                               torch.randn(5, device=device), 0.9, -100, 0))
