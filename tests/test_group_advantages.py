"""Fused group_advantages against the reference."""
import pytest
import torch

import tic_kernels as tk
from tic_kernels import reference as ref
from tic_kernels.ops.group_advantages import group_advantages_op
from tic_kernels.testing import ADVANTAGE_TOL, tolerance

pytestmark = pytest.mark.usefixtures("requires_triton")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("std", ["sample", "population"])
def test_group_advantages_matches_reference(scale, std, device):
    r = torch.randn(40, device=device)
    r[8:12] = 0.7
    got = tk.group_advantages(r, 4, scale=scale, std=std)
    want = ref.group_advantages(r, 4, scale=scale, std=std)
    torch.testing.assert_close(got, want, **tolerance(ADVANTAGE_TOL))
    assert (got[8:12] == 0).all()


def test_group_advantages_ids_lengths_singletons(device):
    ids = torch.randint(-5, 5, (30,), device=device)
    r = torch.randint(0, 3, (30,), device=device).float()  # many ties, some equal groups
    L = torch.randint(0, 20, (30,), device=device)
    for kw in (dict(group_ids=ids), dict(group_ids=ids, lengths=L, length_normalize=True)):
        torch.testing.assert_close(tk.group_advantages(r, **kw),
                                   ref.group_advantages(r, **kw), **tolerance(ADVANTAGE_TOL))
    assert tk.group_advantages(torch.randn(3, device=device), 1).eq(0).all()
    assert tk.group_advantages(torch.randn(0, device=device), 1).numel() == 0


def test_group_advantages_opcheck(device):
    r = torch.randn(12, device=device)
    torch.library.opcheck(group_advantages_op, (r, torch.arange(12, device=device) // 3,
                                                "group", True, 1e-6))
