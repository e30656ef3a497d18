"""Fused sequence_logprobs against the reference."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.backend import segments
from tic_kernels.ops.sequence_logprobs import segment_sum_bwd, segment_sum_fwd
from tic_kernels.testing import LONG_SUM_TOL, cu_seqlens_from, mask_from, tolerance

pytestmark = pytest.mark.usefixtures("requires_triton")


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_reference(reduce, dtype, padded, device):
    lengths = torch.tensor([3, 0, 2500, 1])  # empty, one token, longer than a block
    g = torch.randn(4, device=device)
    if padded:
        layout = {"mask": mask_from(lengths, 2600, holes=True).to(device)}
        vals = torch.randn(4, 2600, device=device).to(dtype)
        vals[~layout["mask"]] = float("nan")  # never read
    else:
        layout = {"cu_seqlens": cu_seqlens_from(lengths).to(device)}
        vals = torch.randn(int(lengths.sum()), device=device).to(dtype)
    x, y = vals.clone().requires_grad_(True), vals.clone().requires_grad_(True)
    a = tk.sequence_logprobs(x, reduce=reduce, **layout)
    b = ref.sequence_logprobs(y, reduce=reduce, **layout)
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert a.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(a, b, **tolerance(LONG_SUM_TOL))  # 2.5k-term fp32 sums
    # sum: the gradient is g itself, exactly; mean: g / L, which a GPU rounds as g * (1 / L)
    # (the H100 run differed by 7e-8 relative, one rounding)
    torch.testing.assert_close(x.grad, y.grad, atol=0, rtol=0 if reduce == "sum" else 2 ** -22)
    if padded:
        assert (x.grad[~layout["mask"]] == 0).all()


def test_segment_opcheck(device):
    cu = cu_seqlens_from(torch.tensor([2, 0, 5])).to(device)
    seg_cu, _ = segments(cu, None, device)
    v = torch.randn(7, device=device, requires_grad=True)
    torch.library.opcheck(segment_sum_fwd, (v, seg_cu, None, True))
    out, count = segment_sum_fwd(v.detach(), seg_cu, None, True)
    torch.library.opcheck(segment_sum_bwd, (torch.randn(3, device=device), seg_cu, None, count,
                                            True, v.detach()))
