"""The options the public functions accept: their values, defaults and bounds, in one place
(validation.py checks them, the reference and the kernels read them)."""
from __future__ import annotations

RATIOS = ("trajectory", "sequence_mean", "token", "none")
CLIP_MODES = ("two_sided", "upper")
# The per-unit objective of the ratio x (docs/spec.md, op 4): the clipped surrogate of PPO /
# GRPO ("clip", with its optional upper bound ``delta``), CISPO's detached clipped weight on
# log pi, SAPO's soft sigmoid gate (its temperatures for positive and negative advantages),
# DPPO's detached ratio on log pi inside a trust region of the token's probability (total
# variation or binary KL; token ratio only), DRO's A log pi less a quadratic penalty of the
# token's log-ratio (its strength ``dro_beta``; token ratio only), GMPO's unclipped x A of the
# geometric mean of the tokens' ratios, each token's log-ratio clipped on the side the
# advantage pushes it (sequence_mean only), VESPO's detached gamma weight of the trajectory's
# ratio on log pi (its shape k and rate lambda by the advantage's sign), KL-Cov's unclipped
# x A less a penalty on the |log-ratio| of the few tokens of largest advantage-logp covariance
# (token ratio only)
OBJECTIVES = ("clip", "cispo", "sapo", "dppo_tv", "dppo_kl", "dro", "gmpo", "vespo", "kl_cov")
TOKEN_ONLY_OBJECTIVES = ("dppo_tv", "dppo_kl", "dro", "kl_cov")
# SAPO's temperatures' defaults: TRL's sapo_temperature_pos / _neg, verl's tau_pos / _neg
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05
# VESPO's gamma weight's defaults (TRL's vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
# vespo_lambda_neg), its rate's floor and the bounds of its log-weight (TRL's)
VESPO_K_POS, VESPO_LAMBDA_POS, VESPO_K_NEG, VESPO_LAMBDA_NEG = 2.0, 3.0, 3.0, 2.0
VESPO_MIN_LAMBDA = 1e-4
VESPO_LOG_W_MIN, VESPO_LOG_W_MAX = -18.420680743952367, 20.0  # log(1e-8), 20
# KL-Cov's defaults (verl's PolicyLossConfig kl_cov_ratio and ppo_kl_coef; its loss function
# falls back to a weight of 1.0 only when the config holds None): the share of the loss tokens
# under the penalty, and the penalty's weight
KL_COV_RATIO, KL_COV_COEF = 0.0002, 0.1
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REDUCES = ("sum", "mean")
SCALES = ("group", "batch", "none")
STDS = ("sample", "population")
# Correction for the sampler's log-probabilities (op 4b): the weight's level and what happens
# outside [rollout_is_min, rollout_is_max] (TRL's vllm_importance_sampling_mode values)
ROLLOUT_IS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# rollout_is_max when it is not given: the default of TRL's vllm_importance_sampling_clip_max
# (where TRL's None means no bound, as float("inf") does here)
ROLLOUT_IS_MAX = 3.0

# A target equal to it has logp 0 and no gradient (PyTorch's and TRL's convention); the losses
# also use it internally to mark padded positions.
IGNORE_INDEX = -100

# exp(MAX_LOG_RATIO_BOUND) = 1.1e26: a capped ratio times an advantage of 1000 and a sequence of
# a million tokens (the weight of seq-mean-token-sum) stays finite in float32 (3.4e38).
MAX_LOG_RATIO_BOUND = 60.0


def default_aggregation(ratio: str) -> str:
    """token-mean for the token ratio (GRPO, DAPO), seq-mean-token-mean for the others."""
    return "token-mean" if ratio == "token" else "seq-mean-token-mean"


# The fused LM head's largest chunk: rows whose logits take at most this many bytes (the
# chunk's gradient is written over them), 1.2 GiB: 4240 rows of a 151,936-token vocabulary in
# bf16, so 16k tokens make 4 chunks of 4096 rows. The fewer the chunks, the fewer passes of
# the d weight GEMMs over d weight (each reads and writes it) and roundings of it when it
# accumulates in bf16; the memory beyond the gradients stays about one chunk.
LM_HEAD_CHUNK_BYTES = int(1.2 * 2 ** 30)


def lm_head_chunk_rows(vocab: int, itemsize: int) -> int:
    """Rows per chunk of the fused LM head under LM_HEAD_CHUNK_BYTES (at least one)."""
    return max(1, LM_HEAD_CHUNK_BYTES // max(1, vocab * itemsize))
