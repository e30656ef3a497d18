"""tic_kernels: fused kernels for RL fine-tuning of language models with TIC-GRPO, GRPO, DAPO
and GSPO. Importing never needs a GPU or the compiled extension; see docs/spec.md for the math."""
from .ops.group_advantages import group_advantages
from .ops.lm_head import linear_token_logprobs
from .ops.lm_head_loss import linear_tic_loss
from .ops.ratio_loss import tic_loss_from_logprobs
from .ops.sequence_logprobs import sequence_logprobs
from .ops.tic_loss import TICLoss, tic_loss
from .ops.token_logprobs import token_logprobs
from .output import LossOutput

__version__ = "0.1.0"

__all__ = [
    "LossOutput",
    "TICLoss",
    "group_advantages",
    "linear_tic_loss",
    "linear_token_logprobs",
    "sequence_logprobs",
    "tic_loss",
    "tic_loss_from_logprobs",
    "token_logprobs",
]
