"""tic_kernels: fused kernels for RL fine-tuning of language models with TIC-GRPO, GRPO, DAPO
and GSPO. Importing never needs a GPU or the compiled extension; see docs/spec.md for the math."""
from .advantages import group_advantages
from .fused import TICLoss, tic_loss
from .linear import linear_tic_loss, linear_token_logprobs
from .logprobs import token_logprobs
from .loss import tic_loss_from_logprobs
from .output import LossOutput
from .segments import sequence_logprobs

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
