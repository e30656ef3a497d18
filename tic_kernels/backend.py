"""What the kernel modules share: which implementation runs (Triton on CUDA, and on the CPU
under TRITON_INTERPRET=1, else the reference; float64 always takes the reference, the kernels
compute in fp32), how kernels launch and register as torch.library ops, the Triton helpers
several kernels use, and the segment layout of the per-sequence kernels.

TRITON_INTERPRET counts as it was when triton and tic_kernels were imported: Triton builds
each kernel (its own library's included) for the interpreter or for a GPU as the kernel's
module is imported, and cannot change it afterwards. Set later (a notebook cell, or after
another library imported triton), it is ignored with a warning and CPU tensors take the
reference path; unset after the import, CPU tensors take the reference path too.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

# Tokens per block of the per-sequence kernels (sequence sums, the ratio loss).
BLOCK_TOKENS = 1024


# the bytes mapping that os.environ keeps in step with every change made through it (POSIX)
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def environment(name: str):
    """os.environ.get(name), read at every call: straight from os.environ's bytes mapping
    (os.environ.get itself encodes, decodes and, for an unset name, raises and catches a
    KeyError: host time that each public call would pay)."""
    if _ENVIRON is None:
        return os.environ.get(name)
    value = _ENVIRON.get(name.encode())
    return None if value is None else value.decode()


def _built_for_interpreter() -> bool:
    """Whether this module's kernels and Triton's own library functions (tl.max, ...) were
    built for the interpreter: TRITON_INTERPRET=1 when each was imported."""
    from triton.runtime.interpreter import InterpretedFunction
    return (os.environ.get("TRITON_INTERPRET", "0") == "1"
            and isinstance(tl.max, InterpretedFunction))


BUILT_FOR_INTERPRETER = _built_for_interpreter()
_WARNED = []


def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter: TRITON_INTERPRET=1 now and when
    triton and tic_kernels were imported (see the module's docstring)."""
    now = environment("TRITON_INTERPRET") == "1"
    if now and not BUILT_FOR_INTERPRETER and not _WARNED:
        _WARNED.append(True)
        warnings.warn("TRITON_INTERPRET=1 is set, but it was not when triton was imported (by "
                      "tic_kernels, or before it by another library such as transformers), so "
                      "Triton built its kernels for a GPU: the variable is ignored, and CPU "
                      "tensors take the plain PyTorch reference path. To run the Triton kernels "
                      "on the CPU, set TRITON_INTERPRET=1 in the environment before anything "
                      "imports triton.", stacklevel=3)
    return now and BUILT_FOR_INTERPRETER


def use_triton(t: torch.Tensor) -> bool:
    if t.dtype == torch.float64:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_fake(t) -> bool:
    if type(t) in _EAGER_TYPES:  # the eager case, answered at once
        return False
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and is_fake(t)


def tracing(t: torch.Tensor) -> bool:
    """Whether a graph is being traced through this call (torch.compile, or AOT / make_fx on
    fake tensors): the ops' torch.library form must run then, not the launchers directly."""
    return torch.compiler.is_compiling() or _is_fake(t)


def launch(kernel, grid, *args, **meta):
    """``wrap_triton(kernel)[grid](*args, **meta)``, the one way this package launches kernels.

    On a GPU, wrap_triton makes the launch traceable by torch.compile. Under TRITON_INTERPRET=1
    wrap_triton returns the raw interpreted kernel, which would run on fake tensors while
    torch.compile or opcheck trace the op; there the launch is skipped, since tracing needs only
    the shapes of the outputs the op allocated.
    """
    first = args[0]  # every kernel's first argument is a tensor
    if _is_fake(first) and interpreting():  # a trace's tensors are all fake, or none
        return
    if (first.is_cuda and (device := first.device).index is not None
            and not torch.compiler.is_compiling()
            and device.index != torch.cuda.current_device()):
        # Triton launches on the current device: switch to the tensors' own (cuda:1 while
        # the current device is cuda:0), only then (a switch costs host time at every
        # launch). Compiled graphs place their own guards.
        with torch.cuda.device(device):
            torch.library.wrap_triton(kernel)[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def triton_op(name, *, mutates_args):
    """Registers ``fn`` as the torch.library op ``name`` (namespace tic_kernels).

    On a GPU: ``torch.library.triton_op``, so torch.compile traces into it and sees the
    kernels. Under TRITON_INTERPRET=1 kernel launches cannot be captured in a graph, so the op
    is an opaque ``custom_op`` whose fake implementation is the same function (``launch``
    skips the kernel on fake tensors): compiled graphs then call the interpreter at run time.
    """
    def register(fn):
        if not interpreting():
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op
    return register


def first_order_only(backward):
    """Wraps a backward of the reference or of the kernels: under create_graph=True (grad mode
    on inside backward) it raises instead of returning a gradient with no graph, which would be
    silently wrong."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("tic_kernels ops are differentiable once: double backward "
                               "(create_graph=True) is not supported")
        return backward(ctx, *grads)
    return wrapper


def inputs_by_name(op, inputs):
    """A registered op's inputs as {argument name: value} (setup_context gets them by position)."""
    return dict(zip(op_argument_names(op), inputs))


def grads_by_name(op, **grads):
    """The tuple a registered op's backward returns: the named gradients, None elsewhere."""
    names = op_argument_names(op)
    assert set(grads) <= set(names), (sorted(grads), names)
    return tuple(grads.get(name) for name in names)


def op_argument_names(op):
    return [a.name for a in op._opoverload._schema.arguments]


@triton.jit
def as_f32(x):
    """A float scalar argument of a kernel in fp32. Triton types a Python float argument
    fp32, but Inductor, when it compiles a graph that launches these kernels, passes Python
    floats as fp64: an fp32 value carried through a loop would turn fp64 and fail to
    compile. Each kernel casts its float arguments first."""
    return tl.cast(x, tl.float32)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """x (fp32) rounded to ``dtype`` to nearest-even. The GPU does that in ``.to``; the
    interpreter truncates fp32 -> bf16, so there (EMULATE_RNE) the rounding is done on the bits."""
    if EMULATE_RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def emulate_rne(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()


def dense(t):
    """t as an eager launcher hands it to a kernel that indexes it by flat offset: its
    elements in one contiguous run, of any shape (t itself when it is contiguous: no view,
    no copy, each of which costs a call host time), or None."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def flat(t):
    """t as the kernels index it: one contiguous run of its elements (a view when it already
    is one), or None."""
    if t is None or (t.dim() == 1 and t.is_contiguous()):  # (a reshape costs host time)
        return t
    return t.reshape(-1).contiguous()


def kernel_segments(cu_seqlens, mask):
    """(cu or None, B, T) as the eager per-sequence kernels read a layout: packed, cu_seqlens
    as given (int32 or int64) and T 0; padded, None and the mask's (B, T) (sequence i is rows
    [i T, (i + 1) T))."""
    if cu_seqlens is not None:
        return cu_seqlens.contiguous(), cu_seqlens.numel() - 1, 0
    return (None,) + tuple(mask.shape)


def segments(cu_seqlens, mask, device):
    """(cu (B+1,) int64, flat bool mask or None) for either layout, without a host sync."""
    if cu_seqlens is not None:
        return cu_seqlens.to(device=device, dtype=torch.int64), None
    B, T = mask.shape
    cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
    return cu, mask.reshape(-1).to(torch.bool)


@triton.jit
def segment_bounds(cu_ptr, i, N, span=1):
    """[start, end) of segment i (with span, of segments i to i + span - 1 together), clamped
    to [0, N]: with the value checks off, a bad cu_seqlens gives wrong numbers, never an
    out-of-bounds access."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + i), 0), N)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + i + span), start), N)
    return start, end
