#!/usr/bin/env bash
# The project's GPU check: one prepared run on a machine with an NVIDIA GPU and no package index
# (about 6 minutes on a fresh H100 or H200), headline first, every step under its own timeout and
# all of them under one deadline (GPU_CHECK_BUDGET_S, default 510 s: the device tool kills a
# command at 600 s), so that a slow step never costs the summary; the logs are archived after
# every step.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # the same control flow on a CPU, tiny shapes
#
#   1. the C++/CUDA extension builds in the background (timeout; packing falls back without it)
#   2. headline: fwd+bwd bf16 at V = 151936, N = 4096 and 16384: tic_loss token and trajectory
#      against Liger, token_logprobs against flash-attn, end to end and in device time
#   2b. the fused LM head (linear_tic_loss) at 16384 x 4096 x 151936 and 4096 x 2048 x 131072
#      bf16, token and trajectory (and 8192-token sequences, longer than a chunk), against the
#      unfused path, Cut Cross-Entropy and Liger's fused linear GRPO loss: time, TFLOP/s,
#      memory beyond the gradients, d weight's error against float64
#   3. sweep: BLOCK_V x num_warps of the forward and backward kernels at 16384 x 151936, then
#      the small-batch backward's programs per row
#   4. the CUDA tests, in parallel when pytest-xdist is there
#   4b. op 7: the vocabulary split over 2 and 3 processes sharing the one GPU (gloo on CUDA
#      tensors: nccl refuses two ranks on one device) against the unsplit result
#   5. a CUDA-graph capture of the loss with the value checks off
#   6. two trainer steps on CUDA, in fp32 (per-sequence sdpa) and with --amp bf16 (varlen flash)
#   7. the quick benchmarks against the peers that import (packing, tic_loss, token_logprobs)
#
# OUT_DIR receives at most 8 files (all the device tool returns): summary.txt, headline.json,
# linear.json, sweep.json, the three quick-benchmark JSON files and logs.tar.gz. summary.txt
# reads
#   gpu: <name> / headline: exit N in S (<targets>) / linear: exit N in S (<targets>) /
#   sweep: exit N / build: exit N /
#   tests: exit N (<pytest tail>) / vocab_parallel: exit N (<pytest tail>) /
#   graph: exit N (<result>) / trainer: exit N (fp32),
#   exit N (--amp bf16) / bench: exit N
# Peer wheels (liger-kernel, flash-attn's Python parts, cut-cross-entropy) travel in a git-ignored .whl/ folder and
# are installed with --no-index --no-deps into .whl/site, put on PYTHONPATH.
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-510}))
export PYTHONPATH="$PWD:$PWD/.whl/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
archive() { tar -czf "$out/logs.tar.gz" -C "$logs" --exclude=train_run . 2> /dev/null; }
# step NAME SECONDS CMD...: runs CMD under timeout (SIGINT first, so pytest and the benchmarks
# still write their summaries; never past the deadline), logging to NAME.log; returns its exit
# status and leaves the seconds it took in $took
step() {
    local name=$1 secs=$2 start=$SECONDS rc left; shift 2
    left=$((deadline - SECONDS - 15))
    if [ "$left" -lt "$secs" ]; then secs=$left; fi
    if [ "$secs" -lt 5 ]; then
        echo "skipped: the deadline is reached" > "$logs/$name.log"; took="0 s"; return 124
    fi
    timeout -s INT -k 10 "$secs" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    took="$((SECONDS - start)) s"
    archive
    return $rc
}

if [ $dry = 1 ]; then
    export TRITON_INTERPRET=1 TIC_KERNELS_BUILD_EXT=0
    # the tests step runs a selection: the suite runs them all; here only the control flow counts
    device=cpu shape=8x128 hshape=8x128 lshape=8x16x128 long=8 reps=(--reps 1)
    tests=(tests/test_errors.py -k "rollout and tic_loss_from_logprobs")
    vp=(-k "bad_inputs and uneven")
    train=(--steps 1 --prompts 2 --group 2)
    bench=(--device cpu --shapes 8x128 --dtypes float32 --packing 8x64 --no-linear)
    sweep=(--blocks 256 --warps 4 --reps 1 --split-rows 4)
    say "gpu: none (dry run on the CPU)"
else
    device=cuda shape=16384x151936 hshape=4096x151936,16384x151936 long=8192
    lshape=16384x4096x151936,4096x2048x131072 tests=(tests/test_token_logprobs.py
        tests/test_tic_loss.py tests/test_linear.py tests/test_sequence_logprobs.py
        tests/test_packing.py tests/test_peers.py tests/test_errors.py tests/test_robustness.py
        tests/test_properties.py tests/test_launches.py tests/test_lm_head_plan.py)
    # the headline measured 16384 x 151936; the peers' comparison at a quarter of it keeps
    # the reference provider's full-size runs out of the budget
    train=(--steps 2) bench=(--device cuda --quick --shapes 4096x151936 --no-linear) reps=() sweep=()
    vp=()
    say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl > "$logs/wheels.log" 2>&1
fi

# 1. the extension, in the background; CUDA_HOME from nvcc when unset
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ $dry = 1 ]; then
    (echo "dry run: build skipped"; exit 0) > "$logs/build.log" 2>&1 &
else
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 \
        python3 -m pip install --no-build-isolation --no-deps -e . > "$logs/build.log" 2>&1 &
fi
build_pid=$!

# 2-3. the headline and the sweep need only Triton: they run while the extension builds
step headline 150 python3 benchmarks/headline.py --device $device --shape $hshape --out "$out" \
    ${reps[@]+"${reps[@]}"}
say "headline: exit $? in $took ($(grep -h '^targets:' "$logs/headline.log" | tail -n 1))"
step linear 200 python3 benchmarks/bench_linear.py --device $device --shapes $lshape \
    --long-seqlen $long --name linear --out "$out" --providers \
    tic_kernels_linear,tic_kernels_linear_bf16acc,unfused_tic_kernels,cce+tic_loss,liger_fused_linear_grpo \
    ${reps[@]+"${reps[@]}"}
say "linear: exit $? in $took ($(grep -h '^targets:' "$logs/linear.log" | tail -n 1))"
step sweep 100 python3 benchmarks/sweep.py --device $device --shape $shape --out "$out" \
    --budget-s 70 ${sweep[@]+"${sweep[@]}"}
say "sweep: exit $? in $took"

wait $build_pid
say "build: exit $? (packing falls back to PyTorch without the extension)"

# 4. the CUDA tests
xdist=()
if [ $dry = 0 ] && python3 -c "import xdist" 2> /dev/null; then xdist=(-n 8); fi
step tests 180 python3 -m pytest -q -p no:cacheprovider -rfE --durations=15 \
    ${xdist[@]+"${xdist[@]}"} "${tests[@]}"
say "tests: exit $? in $took ($(grep -E '(passed|failed|error)' "$logs/tests.log" | tail -n 1))"

# 4b. op 7 over 2 and 3 processes on the one GPU
step vocab_parallel 120 python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/test_vocab_parallel.py ${vp[@]+"${vp[@]}"}
say "vocab_parallel: exit $? in $took ($(grep -E '(passed|failed|error)' "$logs/vocab_parallel.log" | tail -n 1))"

# 5. CUDA-graph capture of the loss
step graph 60 python3 benchmarks/graph_check.py
say "graph: exit $? in $took ($(tail -n 1 "$logs/graph.log"))"

# 6. two trainer steps, fp32 then bf16 autocast
step trainer 90 python3 -m tic_kernels.train --device $device "${train[@]}" --quiet \
    --out "$logs/train_run"
fp32=$?
step trainer_amp 90 python3 -m tic_kernels.train --device $device "${train[@]}" --amp bf16 \
    --quiet --out "$logs/train_run"
say "trainer: exit $fp32 (fp32), exit $? (--amp bf16)"

# 7. the quick benchmarks (JSON rewritten as results come in, so a timeout keeps them)
step bench 180 python3 benchmarks/run.py "${bench[@]}" --out "$out"
say "bench: exit $? in $took"

archive
rm -rf "$logs"
cat "$summary"
