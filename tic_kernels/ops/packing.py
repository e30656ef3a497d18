"""Op 5: variable-length packing, the Python face of the C++/CUDA extension tic_kernels._C.

``pack`` turns a padded batch (left or right padding, or holes in the attention mask) into the
packed layout of flash-attn's varlen kernels, plus the loss view that ``tic_loss`` consumes:

    batch = pack(input_ids, attention_mask, completion_mask)
    hidden = model(batch.input_ids[None], position_ids=batch.position_ids[None], ...)
    logits = lm_head(hidden[0, batch.loss_rows])          # only the rows that carry a loss
    out = tic_loss(logits, batch.loss_targets, old_logprobs, advantages,
                   cu_seqlens=batch.loss_cu_seqlens)
    padded = unpack(values, batch.indices, B, T, pad=0.0)  # any (N_all, ...) tensor back

``HAS_EXT`` says whether the compiled extension is in use; without it (or for a device it was
not built for) the same results come from the pure-PyTorch reference.
"""
from __future__ import annotations

import torch

from .. import reference
from .. import validation as check
from ..layout import PackedBatch

try:
    from .. import _C  # noqa: F401  (registers torch.ops.tic_kernels.pack / unpack)

    HAS_EXT = True
except ImportError:
    HAS_EXT = False


def _has_kernel(op: str, device: torch.device) -> bool:
    if not HAS_EXT:
        return False
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"tic_kernels::{op}", key)


def _check_mask(name, mask, shape):
    # the extension reads masks as bool: a float mask is refused rather than cast
    if isinstance(mask, torch.Tensor) and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"{name} must be bool or integer 0/1, got {mask.dtype}")
    check.mask_ok(mask, shape, name=name)


def pack(input_ids, attention_mask, completion_mask=None) -> PackedBatch:
    """Pack a padded batch; see the module docstring and PackedBatch.

    Args:
        input_ids: (B, T) int32 or int64.
        attention_mask: (B, T) bool or 0/1: the tokens that exist.
        completion_mask: (B, T) bool or 0/1, inside the attention mask: the generated tokens
            (whose log-probabilities the loss uses). Default: no loss rows.
    """
    check.int_tensor("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (B, T), got shape {tuple(input_ids.shape)}")
    if completion_mask is None:
        completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    with check.one_read():
        _check_mask("attention_mask", attention_mask, input_ids.shape)
        _check_mask("completion_mask", completion_mask, input_ids.shape)
        check.same_device("input_ids", input_ids, attention_mask=attention_mask,
                          completion_mask=completion_mask)
        if check.checking_values(attention_mask, completion_mask):
            def outside():
                raise ValueError("completion_mask marks tokens outside attention_mask")
            check.value_check((completion_mask.bool() & ~attention_mask.bool()).any(), outside)
    if not _has_kernel("pack", input_ids.device):
        return reference.varlen_pack(input_ids, attention_mask, completion_mask)
    *tensors, max_seqlen = torch.ops.tic_kernels.pack(input_ids, attention_mask, completion_mask)
    return PackedBatch(*tensors, int(max_seqlen))  # a host int, as flash-attn's kernels take it


def unpack(values, indices, B, T, pad=0.0):
    """Scatter packed ``values`` (N, ...) back to (B, T, ...) at ``indices`` (from pack);
    every other position holds ``pad``. Differentiable w.r.t. values."""
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise ValueError("values must be a tensor with a leading token dimension (N, ...)")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError("indices must be the 1-D int64 tensor returned by pack")
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but values has "
                         f"{values.shape[0]} rows")
    for name, n in (("B", B), ("T", T)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    check.same_device("values", values, indices=indices)
    if check.checking_values(indices) and indices.numel():
        def outside():
            raise ValueError(f"indices must lie in [0, B*T) = [0, {B * T})")

        def repeated():
            raise ValueError("indices must not repeat (two rows would be scattered to one place)")
        in_order = indices.sort().values
        with check.one_read():
            check.value_check(((indices < 0) | (indices >= B * T)).any(), outside)
            check.value_check((in_order[1:] == in_order[:-1]).any(), repeated)
    if _has_kernel("unpack", values.device):
        return torch.ops.tic_kernels.unpack(values, indices, B, T, pad)
    return reference.varlen_unpack(values, indices, B, T, pad)


if HAS_EXT:
    @torch.library.register_fake("tic_kernels::pack")
    def _pack_fake(input_ids, attention_mask, completion_mask):
        ctx = torch.library.get_ctx()
        n_all, n_loss = ctx.new_dynamic_size(), ctx.new_dynamic_size()
        B = input_ids.shape[0]
        i32, i64 = dict(dtype=torch.int32), dict(dtype=torch.int64)
        return (input_ids.new_empty(n_all), input_ids.new_empty(B + 1, **i32),
                input_ids.new_empty(n_all, **i64), input_ids.new_empty(n_all, **i64),
                input_ids.new_empty(n_loss, **i64), input_ids.new_empty(n_loss),
                input_ids.new_empty(B + 1, **i32), torch.empty((), dtype=torch.int64, device="cpu"))

    @torch.library.register_fake("tic_kernels::unpack")
    def _unpack_fake(values, indices, batch, seqlen, pad):
        return values.new_empty(batch, seqlen, *values.shape[1:])

    def _unpack_setup(ctx, inputs, output):
        _, indices, batch, seqlen, _ = inputs
        ctx.save_for_backward(indices)
        ctx.rows = batch * seqlen

    def _unpack_backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        rows = grad.reshape(ctx.rows, *grad.shape[2:])
        return rows.index_select(0, indices), None, None, None, None

    torch.library.register_autograd("tic_kernels::unpack", _unpack_backward,
                                    setup_context=_unpack_setup)
