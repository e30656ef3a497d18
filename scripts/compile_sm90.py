"""Compiles the Triton kernels of tic_kernels for an H100 (sm_90) without a GPU.

The interpreter runs the kernels' semantics on the CPU but never runs Triton's GPU compiler; this
script does (Triton's front end, its LLVM back end and the ptxas it ships need no device), over
the element types and a covering set of the constexpr variants the ops launch, so a kernel that
would not compile on the GPU fails here (a global that is not a tl.constexpr, say). Prints each
variant's registers, stack (spill) bytes and shared memory, read from the cubin with Triton's
cuobjdump; exits non-zero on any failure. Must run without TRITON_INTERPRET.

    python scripts/compile_sm90.py
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90: unset TRITON_INTERPRET (the kernels must be JIT functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tic_kernels import backend  # noqa: E402
from tic_kernels.ops import group_advantages, sequence_logprobs, token_logprobs  # noqa: E402
from tic_kernels.ops import scale as grad_scale, tic_loss_two_pass, token_selection  # noqa: E402
from tic_kernels import value_checks  # noqa: E402
from tic_kernels.ops import ratio_loss_kernels as ratio_loss  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("fp32", "bf16", "fp16")  # Triton's names of the logits' element types


def variants():
    """(name, kernel, {arg: type}, {constexpr: value}, num_warps)"""
    for dt, ent, unit in itertools.product(FLOATS, (False, True), (True, False)):
        # unit: contiguous columns (stride 1, specialised) or 64-bit strided column offsets;
        # the padded layout's mask and the loss's counter with the entropy, the loss's
        # scaled coefficients (SCALED) likewise in the backward; the forward with and
        # without its split over the runs of columns (few rows)
        for split in (False, True):
            yield (f"token_logprobs_fwd[{dt},entropy={ent},unit_stride={unit},split={split}]",
                   token_logprobs._token_logprobs_fwd_kernel,
                   dict(logits_ptr=f"*{dt}", targets_ptr="*i64", mask_ptr="*i1",
                        logp_ptr="*fp32", max_logsum_ptr="*fp32", entropy_ptr="*fp32",
                        counter_ptr="*i32", part_ptr="*fp32", arrived_ptr="*i32",
                        stride_b="i64", stride_t="i64", stride_v="i32", T="i32", V="i32",
                        inv_temperature="fp32", ignore_index="i32", vocab_start="i32"),
                   dict(WITH_ENTROPY=ent, HAS_MASK=ent, CLEAR_COUNTER=ent, SPLIT=split,
                        UNIT_STRIDE_V=unit, BLOCK_V=4096,
                        CHUNK=4096 * token_logprobs.FWD_CHUNK_BLOCKS), 8)
        yield (f"token_logprobs_bwd[{dt},entropy={ent},unit_stride={unit}]",
               token_logprobs._token_logprobs_bwd_kernel,
               dict(logits_ptr=f"*{dt}", grad_ptr=f"*{dt}", targets_ptr="*i32", mask_ptr="*u8",
                    max_logsum_ptr="*fp32", entropy_ptr="*fp32", g_ptr="*fp32",
                    g_entropy_ptr="*fp32", g_loss_ptr="*fp32", norm_ptr="*fp32",
                    stride_b="i64", stride_t="i64", stride_v="i32", stride_gb="i64",
                    stride_gt="i64", stride_gv="i32", stride_g="i32", stride_ge="i32", T="i32",
                    V="i32", cols_per_program="i32", inv_temperature="fp32",
                    entropy_coef="fp32", ignore_index="i32", vocab_start="i32"),
               dict(HAS_G=True, WITH_ENTROPY=ent, SCALED=ent, HAS_MASK=ent, EMULATE_RNE=False,
                    UNIT_STRIDE_V=unit, UNIT_STRIDE_GV=unit, BLOCK_V=4096), 8)
    for dt, padded, ratio in itertools.product(("bf16", "fp32"), (False, True), (2, 3)):
        # the gradient in the forward (ops/tic_loss_two_pass.py): the token-level ratios
        yield (f"tic_loss_two_pass_rows[{dt},padded={padded},ratio={ratio}]",
               tic_loss_two_pass._rows_with_gradient_kernel,
               dict(logits_ptr=f"*{dt}", grad_ptr=f"*{dt}", targets_ptr="*i64", mask_ptr="*i1",
                    logp_ptr="*fp32", max_logsum_ptr="*fp32", entropy_ptr="*fp32",
                    old_ptr="*fp32", ref_ptr="*fp32", roll_ptr="*fp32", adv_ptr="*fp32",
                    cu_ptr="*i32", v_ptr="*fp32", norm_ptr="*fp32", stride_b="i64",
                    stride_t="i64", stride_v="i32", stride_gb="i64", stride_gt="i64",
                    stride_gv="i32", T="i32", V="i32", T_seq="i32", B="i32",
                    inv_temperature="fp32", ignore_index="i32", entropy_coef="fp32",
                    eps_low="fp32", eps_high="fp32", dual_clip="fp32", cap="fp32", beta="fp32",
                    rw_lo="fp32", rw_hi="fp32"),
               dict(WITH_ENTROPY=padded, HAS_MASK=padded, PADDED=padded, RATIO=ratio,
                    TWO_SIDED=True, DUAL=padded, KL_IN_LOSS=not padded, ROLLOUT=1 + padded * 2,
                    RW_MASK=False, EMULATE_RNE=False, UNIT_STRIDE_V=True, UNIT_STRIDE_GV=True,
                    BLOCK_V=4096, CHUNK=4096 * token_logprobs.FWD_CHUNK_BLOCKS,
                    BLOCK_B=backend.BLOCK_TOKENS), 8)
        yield (f"tic_loss_two_pass_weights[padded={padded},agg={ratio}]",
               tic_loss_two_pass._sequence_weights_kernel,
               dict(cu_ptr="*i64", mask_ptr="*u8", v_ptr="*fp32", norm_ptr="*fp32",
                    counter_ptr="*i32", N="i32", T="i32", B="i32", num_tokens="fp32",
                    num_sequences="fp32", max_len="fp32"),
               dict(PADDED=padded, PER_SEQ_MEAN=ratio == 2, AGG=ratio, GIVEN_TOKENS=padded,
                    GIVEN_SEQUENCES=False, BLOCK=backend.BLOCK_TOKENS), 4)
        yield (f"scale[{dt}]", grad_scale._scale_kernel,
               dict(grad_ptr=f"*{dt}", g_ptr="*fp32", n="i64"),
               dict(EMULATE_RNE=False, BLOCK=grad_scale.BLOCK_SCALE), 4)
    for dt, has_mask, mean in itertools.product(("fp32", "bf16"), (False, True), (False, True)):
        yield (f"segment_sum_fwd[{dt},mask={has_mask},mean={mean}]",
               sequence_logprobs._segment_sum_fwd_kernel,
               dict(values_ptr=f"*{dt}", cu_ptr="*i64", mask_ptr="*i1", out_ptr="*fp32",
                    count_ptr="*i32", N="i32"),
               dict(HAS_MASK=has_mask, MEAN=mean, BLOCK=backend.BLOCK_TOKENS), 4)
        yield (f"segment_sum_bwd[{dt},mask={has_mask},mean={mean}]",
               sequence_logprobs._segment_sum_bwd_kernel,
               dict(grad_out_ptr="*fp32", cu_ptr="*i64", mask_ptr="*i1", count_ptr="*i32",
                    grad_ptr=f"*{dt}", N="i32"),
               dict(HAS_MASK=has_mask, MEAN=mean, EMULATE_RNE=False, BLOCK=backend.BLOCK_TOKENS), 4)
    for scale, sample in itertools.product(range(3), (False, True)):
        yield (f"group_advantages[scale={scale},sample={sample}]",
               group_advantages._group_advantages_kernel,
               dict(rewards_ptr="*fp32", group_ptr="*i64", batch_std_ptr="*fp32", out_ptr="*fp32",
                    B="i32", eps="fp32"),
               dict(SCALE=scale, SAMPLE_STD=sample, BLOCK=group_advantages.BLOCK_B), 4)
    options = [(True, False, True, False, False, False, 0, False),
               (False, True, False, True, True, True, 0, False),
               (True, True, True, True, True, False, 0, False),
               # the sampler correction (op 4b): per token, per sequence, given weights
               (True, False, True, True, True, False, 1, True),
               (False, True, True, False, False, True, 2, False),
               (True, False, False, True, False, False, 3, False)]
    # and KL-Cov: the token ratio with given weights, the KL and the entropy
    variants = list(itertools.product(range(4), options)) + [
        (2, (True, False, False, True, True, True, 3, False))]
    for ratio, (two_sided, dual, per_seq, mask, ref, ent, rollout, rw_mask) in variants:
        # the padded layout with the mask; the loss reduced in the same launch (FINALIZE) on
        # every other variant
        finalize = (ratio + rollout) % 2 == 0
        # the objectives (clip, cispo, sapo, dppo, dro, gmpo, vespo, kl_cov; dual_clip only
        # with clip),
        # delta with clip and a KL, the KL's bias correction on the odd ratios
        objective = 0 if dual else (ratio + rollout) % 3
        if ratio == 2 and not dual and rollout in (0, 1, 3):  # the token ratio: DPPOs, DRO
            objective = {0: 3, 1: 4, 3: 5}[rollout]
        if ratio == 2 and not dual and rollout == 3 and ref:
            objective = 8
        if ratio == 1 and not dual and rollout in (1, 3):  # sequence_mean: GMPO too
            objective = 6
        if ratio == 0 and not dual and rollout == 1:  # VESPO, the sampler's weights in w
            objective = 7
        has_delta = (objective == 0 and not dual and ref) or objective == 4
        kl_bias = ref and ratio % 2 == 1
        # the off-policy mask against the sampler's log-probs, and against the old ones
        opsm = rollout in (1, 2) or (rollout == 0 and ratio == 0)
        # the top-entropy selection: with KL-Cov (both flags), and a sequence ratio's weights
        top_entropy = objective == 8 or (ratio == 0 and rollout == 2)
        yield (f"ratio_loss_fwd[ratio={ratio},two_sided={two_sided},dual={dual},mask={mask},"
               f"ref={ref},ent={ent},rollout={rollout},rw_mask={rw_mask},finalize={finalize},"
               f"objective={objective},delta={has_delta},kl_bias={kl_bias},opsm={opsm},"
               f"top_entropy={top_entropy}]",
               ratio_loss._ratio_loss_fwd_kernel,
               dict(logp_ptr="*fp32", old_ptr="*fp32", ref_ptr="*fp32", ent_ptr="*fp32",
                    adv_ptr="*bf16", cu_ptr="*i32", mask_ptr="*i1", roll_ptr="*fp32",
                    sel_ptr="*u8", coef_ptr="*fp32", coef_ent_ptr="*fp32", part_ptr="*fp32",
                    loss_ptr="*fp32", stats_ptr="*fp32", norm_ptr="*fp32", counter_ptr="*i32",
                    N="i32", T="i32", B="i32", eps_low="fp32", eps_high="fp32",
                    dual_clip="fp32", delta="fp32",
                    param_pos="fp32", param_neg="fp32", param2_pos="fp32",
                    param2_neg="fp32", cap="fp32", beta="fp32", rw_lo="fp32",
                    rw_hi="fp32", opsm_threshold="fp32", num_tokens="fp32",
                    num_sequences="fp32", max_len="fp32", entropy_coef="fp32"),
               dict(RATIO=ratio, TWO_SIDED=two_sided, DUAL=dual, PER_SEQ_MEAN=per_seq,
                    HAS_MASK=mask, HAS_REF=ref, KL_IN_LOSS=ref, HAS_ENT=ent, ROLLOUT=rollout,
                    RW_MASK=rw_mask, PADDED=mask, FINALIZE=finalize, AGG=ratio % 4,
                    GIVEN_TOKENS=dual, GIVEN_SEQUENCES=per_seq, RW_PER_SEQ=rollout == 2,
                    OBJECTIVE=objective, HAS_DELTA=has_delta, KL_BIAS=kl_bias,
                    OPSM=opsm, TOP_ENTROPY=top_entropy,
                    BLOCK=backend.BLOCK_TOKENS, BLOCK_B=ratio_loss.BLOCK_SEQS), 4)
    for padded, kl_cov in itertools.product((False, True), (False, True)):
        # the batch-wide token selections (ops/token_selection.py): packed with a u8 mask and
        # int32 cu_seqlens, padded with a bool mask; KL-Cov with and without the entropy's
        layout = dict(cu_ptr="*i32", mask_ptr="*u8") if not padded else dict(
            cu_ptr="*u8", mask_ptr="*i1")
        switches = dict(PADDED=padded, HAS_MASK=padded or kl_cov)
        yield (f"selection_pass[padded={padded},kl_cov={kl_cov}]",
               token_selection._selection_pass_kernel,
               dict(logp_ptr="*fp32", entropy_ptr="*fp32", adv_ptr="*bf16", **layout,
                    flags_ptr="*u8", key_ptr="*fp32", counts_ptr="*i32", sums_ptr="*fp64",
                    R="i32", T="i32", B="i32", search_steps="i32"),
               dict(**switches, KL_COV=kl_cov, TOP_ENTROPY=not kl_cov or padded,
                    BLOCK=token_selection.BLOCK_POS), 4)
        yield (f"covariance_keys[padded={padded},mask={switches['HAS_MASK']}]",
               token_selection._covariance_keys_kernel,
               dict(logp_ptr="*fp32", adv_ptr="*fp32", **layout, counts_ptr="*i32",
                    sums_ptr="*fp64", key_ptr="*fp32", R="i32", T="i32", B="i32", P="i32",
                    search_steps="i32"),
               dict(**switches, BLOCK=token_selection.BLOCK_POS,
                    BLOCK_P=token_selection.BLOCK_PART), 4)
        yield (f"entropy_kept[padded={padded},mask={switches['HAS_MASK']}]",
               token_selection._entropy_kept_kernel,
               dict(entropy_ptr="*fp32", sorted_ptr="*fp32", **layout, counts_ptr="*i32",
                    flags_ptr="*u8", R="i32", B="i32", P="i32", below_share="fp32"),
               dict(**switches, BLOCK=token_selection.BLOCK_POS,
                    BLOCK_P=token_selection.BLOCK_PART), 4)
    yield ("covariance_take", token_selection._covariance_take_kernel,
           dict(order_ptr="*i64", counts_ptr="*i32", flags_ptr="*u8", R="i32", P="i32",
                share_bits="i64"),
           dict(BLOCK=token_selection.BLOCK_POS, BLOCK_P=token_selection.BLOCK_PART), 4)
    for packed, tmask in ((True, "*i1"), (False, "*u8"), (False, None)):
        # the batched value checks: packed (int64 targets, int32 cu_seqlens, a bool loss
        # mask), padded (int32 targets under a u8 mask whose 0/1 values it checks too)
        yield (f"value_checks[packed={packed},target_mask={tmask}]",
               value_checks._value_checks_kernel,
               dict(targets_ptr="*i64" if packed else "*i32", tmask_ptr=tmask or "*i64", R="i32",
                    vocab="i32", ignore_index="i32", cu_ptr="*i32" if packed else "*i64",
                    B="i32", n="i32", mask_ptr="*i1" if packed else "*u8", M="i32",
                    flags_ptr="*i32"),
               dict(TARGETS=True, TARGET_MASK=tmask is not None, IGNORE=not packed, CU=packed,
                    MASK01=not packed, BLOCK=value_checks.BLOCK), 4)
    for ratio, agg, given in ((0, 0, False), (1, 3, True), (2, 1, True), (3, 2, False)):
        yield (f"ratio_loss_finalize[ratio={ratio},agg={agg},given={given}]",
               ratio_loss._ratio_loss_finalize_kernel,
               dict(part_ptr="*fp32", loss_ptr="*fp32", stats_ptr="*fp32", norm_ptr="*fp32",
                    B="i32", num_tokens="fp32", num_sequences="fp32", max_len="fp32",
                    entropy_coef="fp32"),
               dict(RATIO=ratio, AGG=agg, GIVEN_TOKENS=given, GIVEN_SEQUENCES=given,
                    RW_PER_SEQ=given, BLOCK=ratio_loss.BLOCK_SEQS), 4)


def with_fp64_scalars(all_variants):
    """Inductor, when a compiled graph launches these kernels, passes Python floats as fp64:
    the first variant of each kernel again with every fp32 scalar argument typed fp64."""
    seen = set()
    for name, kernel, types, consts, warps in all_variants:
        yield name, kernel, types, consts, warps
        if kernel not in seen:
            seen.add(kernel)
            fp64 = {a: "fp64" if t == "fp32" else t for a, t in types.items()}
            yield f"{name.split('[')[0]}[fp64 scalars]", kernel, fp64, consts, warps


def resource_usage(cubin):
    """(registers, stack bytes) of the cubin, read by Triton's cuobjdump; stack is where
    spilled registers go."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    spills = re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def main():
    failures = 0
    for name, kernel, types, consts, warps in with_fp64_scalars(variants()):
        signature = {a: types.get(a, "constexpr") for a in kernel.arg_names}
        try:
            out = triton.compile(ASTSource(kernel, signature, constexprs=consts), target=TARGET,
                                 options={"num_warps": warps})
            regs, stack = resource_usage(out.asm["cubin"])
            print(f"ok    {name}: {regs} registers, {stack} B stack (spills), "
                  f"{out.metadata.shared} B shared", flush=True)
        except Exception as e:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e).strip()[:2000]}", flush=True)
    print(f"{failures} failed" if failures else "all kernels compile for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
