#!/usr/bin/env bash
# Compiles the CUDA sources of the packing extension against the CUDA build of torch 2.14.1
# (in .venv-cuda; README.md, "Versions": the CUDA build the package index offers) on a
# machine without a GPU, so a CUDA compile error cannot land unseen, then
# checks that the result imports with CPU and CUDA kernels and packs like the reference.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv-cuda"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "check_cuda_build: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
    exit 1
fi
if [ ! -f "$venv/.ready" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.14.1 "numpy<2.4" setuptools wheel ninja
    touch "$venv/.ready"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$root" && git ls-files -z csrc tic_kernels setup.py pyproject.toml README.md | tar --null -T - -cf -) \
    | tar -xf - -C "$tmp"
cd "$tmp"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
    "$venv/bin/python" setup.py -q build_ext --inplace
"$venv/bin/python" - <<'PY'
import torch
from tic_kernels import reference
from tic_kernels.ops import packing
assert packing.HAS_EXT, "the extension did not import"
for key in ("CPU", "CUDA"):
    for op in ("pack", "unpack"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tic_kernels::{op}", key), (op, key)
g = torch.Generator().manual_seed(0)
attn = torch.rand(16, 64, generator=g) < 0.7
comp = attn & (torch.rand(16, 64, generator=g) < 0.5)
ids = torch.randint(0, 1000, (16, 64), generator=g)
got = packing.pack(ids, attn, comp)
want = reference.varlen_pack(ids, attn, comp)
assert all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors()))
assert got.max_seqlen == want.max_seqlen
print(f"CUDA build OK: torch {torch.__version__}, kernels for CPU and CUDA registered")
PY
