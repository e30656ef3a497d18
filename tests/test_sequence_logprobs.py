"""Fused sequence_logprobs and group_advantages against the reference."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.advantages import group_advantages_op
from tic_kernels.segments import segment_sum_bwd, segment_sum_fwd, segments
from tic_kernels.testing import LOSS_TOL, cu_seqlens_from, mask_from


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
    atol, rtol = LOSS_TOL
    torch.testing.assert_close(a, b, atol=atol * 50, rtol=rtol)  # 2.5k-term fp32 sums
    torch.testing.assert_close(x.grad, y.grad, atol=0, rtol=0)
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


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("std", ["sample", "population"])
def test_group_advantages_matches_reference(scale, std, device):
    r = torch.randn(40, device=device)
    r[8:12] = 0.7
    got = tk.group_advantages(r, 4, scale=scale, std=std)
    want = ref.group_advantages(r, 4, scale=scale, std=std)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got[8:12] == 0).all()


def test_group_advantages_ids_lengths_singletons(device):
    ids = torch.randint(-5, 5, (30,), device=device)
    r = torch.randint(0, 3, (30,), device=device).float()  # many ties, some equal groups
    L = torch.randint(0, 20, (30,), device=device)
    for kw in (dict(group_ids=ids), dict(group_ids=ids, lengths=L, length_normalize=True)):
        torch.testing.assert_close(tk.group_advantages(r, **kw),
                                   ref.group_advantages(r, **kw), atol=1e-6, rtol=1e-6)
    assert tk.group_advantages(torch.randn(3, device=device), 1).eq(0).all()
    assert tk.group_advantages(torch.randn(0, device=device), 1).numel() == 0


def test_group_advantages_opcheck(device):
    r = torch.randn(12, device=device)
    torch.library.opcheck(group_advantages_op, (r, torch.arange(12, device=device) // 3,
                                                "group", True, 1e-6))
