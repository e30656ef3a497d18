#!/usr/bin/env bash
# The project's GPU check, for a machine with an NVIDIA GPU and no package index (at most
# about 7.5 min: build, then the CUDA tests and the benchmarks under timeouts of 180 s and 210 s;
# the benchmark JSON is rewritten as results come in, so a timeout keeps what was measured): builds the package with its CUDA extension, runs the test suite on CUDA, and the
# quick benchmarks (tic_loss forward+backward at N=16384, V=151936 bf16 against the reference
# and torch.compile of the reference, the peers that import, token_logprobs, packing), writing
# logs and JSON into the folder given.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Peer wheels (liger-kernel, trl, flash-attn's Python parts) travel in a git-ignored .whl/
# folder: they are installed with --no-index --no-deps into .whl/site and put on PYTHONPATH.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/.whl/site:${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl > "$out/wheels.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
echo "build: exit $?" | tee "$out/summary.txt"
# the suites that exercise CUDA (the rest is CPU-only: reference, trainer, sm_90 compile);
# a fresh machine compiles every kernel variant once, most of this step's time
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_token_logprobs.py \
    tests/test_tic_loss.py tests/test_sequence_logprobs.py tests/test_packing.py \
    tests/test_peers.py tests/test_errors.py > "$out/tests.log" 2>&1
echo "tests: exit $? ($(tail -n 1 "$out/tests.log"))" | tee -a "$out/summary.txt"
timeout 210 python3 benchmarks/run.py --quick --device cuda --out "$out" > "$out/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$out/summary.txt"
grep -E "^(#|tic_loss|token_logprobs|packing)" "$out/bench.log" | head -80
