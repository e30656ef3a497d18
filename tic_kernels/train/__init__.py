"""A thin TIC-GRPO trainer for Hugging Face causal LMs, built on tic_kernels.

    python -m tic_kernels.train                       # default: tiny Llama learns to count
    python -m tic_kernels.train --algo grpo --steps 200 --out runs/grpo
    python -m tic_kernels.train --model ./my-hf-model --task my_pkg.tasks:make_task
    python -m tic_kernels.train --task long_counting  # long answers: count on for 20 digits
    python -m tic_kernels.train compare --seeds 5 --jobs 2   # every algorithm and ablation
    torchrun --nproc-per-node 2 -m tic_kernels.train  # data parallel (gloo on CPU, nccl on GPU)

Each step: sample G completions for each of P prompts (temperature), score them, turn rewards
into group advantages, take the old log-probabilities under no_grad with the same kernels, then
mu optimisation steps of the loss on the loss tokens: packed with varlen attention on CUDA
(flash-attn when it imports, torch.nn.attention.varlen otherwise), padded sdpa on the CPU. The
loss rows' last hidden states go through the fused LM head (linear_token_logprobs for the old
log-probabilities, linear_tic_loss for the loss): the logits are never held whole. Algorithms:
  tic    the paper's TIC-GRPO: trajectory ratio exp(sum of token log-ratios), upper-only
         clip 1.28, length-corrected group advantages (rewards / completion length);
         tic-two-sided (clip 0.2 / 0.28) and tic-no-length-norm switch one ingredient off,
         as do --clip, --eps-low/--eps-high and --no-length-normalize
  grpo   token ratio, clip-higher 0.2 / 0.28, token-mean (GRPO / DAPO)
  gspo   length-normalised sequence ratio, clip 3e-4 / 4e-4 (GSPO)
  no_is  no importance sampling: the gradient of A * logp is taken once at the old policy and
         reused for the mu steps (the paper's simplified variant)
Logs one line per step and metrics.jsonl; checkpoints with save_pretrained (--resume).
Under torchrun: DDP, or FSDP2 with --fsdp.
"""

from .cli import check_args, main, parser
from .compare import compare
from .loop import ALGOS, StepLog, run, train_step
from .model import LossRowsLM, build_model, shard
from .rollout import loss_view, sample, view_rows
from .tasks import TASKS, CountingTask, LongCountingTask, load_task

__all__ = ["ALGOS", "TASKS", "CountingTask", "LongCountingTask", "LossRowsLM", "StepLog",
           "build_model", "check_args", "compare", "load_task", "loss_view", "main", "parser",
           "run", "sample", "shard", "train_step", "view_rows"]
