"""The packing extension (C++ on CPU, CUDA on GPU) against the pure-PyTorch reference and
flash-attn's documented unpad/pad semantics."""
import pytest
import torch

from tic_kernels import reference as ref
from tic_kernels.ops import packing
from tic_kernels.testing import mask_from

KINDS = ["right", "left", "holes"]


@pytest.fixture(autouse=True, params=["extension", "fallback"])
def implementation(request, monkeypatch):
    """Every test runs on the compiled extension (when built) and on the PyTorch fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(packing, "_has_kernel", lambda op, device: False)
    elif not packing.HAS_EXT:
        pytest.skip("the extension is not built")
    return request.param


def _batch(B, T, kind, seed=0, id_dtype=torch.int64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    attn = mask_from(lengths, T, left_pad=kind == "left", holes=kind == "holes", generator=g)
    prompt = torch.randint(0, 4, (B,), generator=g)  # the first kept tokens are the prompt
    rank = attn.long().cumsum(1) - 1
    comp = attn & (rank >= prompt[:, None])
    ids = torch.randint(0, 50000, (B, T), generator=g, dtype=id_dtype)
    return ids.to(device), attn.int().to(device), comp.to(device)


def _flash_attn_unpad(mask):
    """flash_attn.bert_padding.unpad_input as its docstring specifies it."""
    seqlens = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    return indices, cu, int(seqlens.max()) if seqlens.numel() else 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_pack_matches_reference_and_flash_attn(kind, id_dtype, device):
    ids, attn, comp = _batch(9, 37, kind, id_dtype=id_dtype, device=device)
    p = packing.pack(ids, attn, comp)
    want = ref.varlen_pack(ids, attn, comp)
    for got, exp in zip(p.tensors(), want.tensors()):
        assert got.dtype == exp.dtype and torch.equal(got, exp)
    assert p.max_seqlen == want.max_seqlen
    indices, cu, max_seqlen = _flash_attn_unpad(attn)
    assert torch.equal(p.indices, indices) and torch.equal(p.cu_seqlens, cu)
    assert p.max_seqlen == max_seqlen
    assert torch.equal(p.input_ids, ids.flatten()[indices])


@pytest.mark.parametrize("kind", KINDS)
def test_loss_view_semantics(kind, device):
    ids, attn, comp = _batch(12, 50, kind, seed=1, device=device)
    p = packing.pack(ids, attn, comp)
    nxt = p.loss_rows + 1
    # the next packed token is in the same sequence, is a completion token, and is the target
    assert (p.position_ids[nxt] > 0).all()
    assert comp.flatten()[p.indices[nxt]].all()
    assert torch.equal(p.loss_targets, p.input_ids[nxt])
    # every completion token with a predecessor is predicted exactly once
    assert p.loss_rows.numel() == int((comp.flatten()[p.indices] & (p.position_ids > 0)).sum())
    per_seq = torch.bucketize(p.loss_rows, p.cu_seqlens[1:].long(), right=True)
    counts = torch.bincount(per_seq, minlength=12)
    assert torch.equal(p.loss_cu_seqlens[1:].long(), counts.cumsum(0))
    # position ids restart at 0 and count up inside each sequence
    lengths = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).long()
    expect = torch.cat([torch.arange(int(n), device=device) for n in lengths])
    assert torch.equal(p.position_ids, expect)


@pytest.mark.parametrize("kind", KINDS)
def test_unpack_inverts_pack(kind, device):
    ids, attn, comp = _batch(7, 33, kind, seed=2, device=device)
    p = packing.pack(ids, attn, comp)
    back = packing.unpack(p.input_ids, p.indices, 7, 33, pad=-1)
    keep = attn.bool()
    assert torch.equal(back[keep], ids[keep]) and (back[~keep] == -1).all()
    hidden = torch.randn(p.input_ids.numel(), 4, 3, device=device)
    out = packing.unpack(hidden, p.indices, 7, 33)
    assert out.shape == (7, 33, 4, 3)
    torch.testing.assert_close(out, ref.varlen_unpack(hidden, p.indices, 7, 33), atol=0, rtol=0)


def test_unpack_gradcheck(device):
    ids, attn, comp = _batch(3, 6, "holes", seed=3, device=device)
    p = packing.pack(ids, attn, comp)
    v = torch.randn(p.indices.numel(), 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: packing.unpack(x, p.indices, 3, 6, 0.5), (v,))


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0), (0, 0)])
def test_empty_shapes(B, T, device):
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    m = torch.zeros(B, T, dtype=torch.bool, device=device)
    p = packing.pack(ids, m, m)
    assert p.input_ids.numel() == 0 and p.loss_rows.numel() == 0 and p.max_seqlen == 0
    assert p.cu_seqlens.tolist() == [0] * (B + 1) == p.loss_cu_seqlens.tolist()
    assert packing.unpack(torch.zeros(0, 2, device=device), p.indices, B, T).shape == (B, T, 2)


def test_empty_rows_and_no_completion(device):
    ids, attn, _ = _batch(5, 9, "right", seed=4, device=device)
    attn[1] = 0
    attn[3] = 0
    p = packing.pack(ids, attn)  # no completion mask: no loss rows
    assert p.loss_rows.numel() == 0
    assert p.cu_seqlens[2] == p.cu_seqlens[1] and p.cu_seqlens[4] == p.cu_seqlens[3]


def test_errors(device):
    ids, attn, comp = _batch(2, 4, "right", device=device)
    attn[0, -1], comp[0, -1] = 0, False  # at least one padded position, whatever was drawn
    with pytest.raises(TypeError, match="input_ids must be an int32 or int64"):
        packing.pack(ids.float(), attn, comp)
    with pytest.raises(ValueError, match="input_ids must be 2-D"):
        packing.pack(ids[0], attn[0], comp[0])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\)"):
        packing.pack(ids, attn[:, :3], comp)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        packing.pack(ids, attn, comp[:1])
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        packing.pack(ids, attn * 2, comp)
    with pytest.raises(TypeError, match="completion_mask must be bool or integer"):
        packing.pack(ids, attn, comp.float())
    bad = comp.clone()
    bad[attn == 0] = True
    with pytest.raises(ValueError, match="completion_mask marks tokens outside attention_mask"):
        packing.pack(ids, attn, bad)
    p = packing.pack(ids, attn, comp)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, B\*T\)"):
        packing.unpack(p.input_ids, p.indices, 1, 1)
    with pytest.raises(ValueError, match="indices has"):
        packing.unpack(p.input_ids[:0], p.indices, 2, 4)
    with pytest.raises(ValueError, match="indices must be the 1-D int64"):
        packing.unpack(p.input_ids, p.indices.int(), 2, 4)
    with pytest.raises(ValueError, match="T must be an int >= 0"):
        packing.unpack(p.input_ids, p.indices, 2, -4)


def test_extension_is_used_and_opcheck(device, implementation):
    if implementation == "fallback":
        pytest.skip("checks the extension's ops")
    assert packing._has_kernel("pack", torch.device(device))
    ids, attn, comp = _batch(4, 11, "holes", seed=5, device=device)
    torch.library.opcheck(torch.ops.tic_kernels.pack.default, (ids, attn, comp))
    p = packing.pack(ids, attn, comp)
    v = torch.randn(p.indices.numel(), 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.tic_kernels.unpack.default, (v, p.indices, 4, 11, 0.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    ids, attn, comp = _batch(64, 4096, "holes", seed=6)
    a = packing.pack(ids, attn, comp)
    b = packing.pack(ids.cuda(), attn.cuda(), comp.cuda())
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y.cpu())
    assert a.max_seqlen == b.max_seqlen
