"""The policy: a Hugging Face causal LM (a local directory, or a tiny Llama built from a
config), and the wrapper that returns the last hidden states of the loss rows, for the fused
LM head (tic_kernels.linear_tic_loss) to turn into the loss without the logits."""
from __future__ import annotations

import torch

from tic_kernels.train.attention import attention


def build_model(args, task):
    if args.model:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                    attn_implementation="sdpa")
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=task.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      intermediate_size=2 * args.hidden, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, bos_token_id=task.bos, eos_token_id=task.eos_id,
                      pad_token_id=task.pad_id, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


class LossRowsLM(torch.nn.Module):
    """Last hidden states (N, H) of the loss rows; ``head()`` is the LM head (weight, bias).

    Packed: input_ids (1, N_all) with position_ids restarting per sequence and the varlen
    attention over ``cu_seq_lens_q``; padded: (B, T) with an attention mask and sdpa.
    ``rows`` index the flattened hidden states; ``head_fn(hidden rows, weight, bias)`` turns
    them into the result inside the forward (under FSDP2 the head's parameters are gathered
    only there). Without ``rows``: the next-token logits of each sequence (sampling)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def head(self):
        out = self.lm.get_output_embeddings()
        return out.weight, out.bias

    def forward(self, input_ids, rows=None, position_ids=None, attention_mask=None,
                head_fn=None, **varlen):
        if rows is None:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=False).logits[:, -1]
        with attention(self.lm, "tic_varlen" if varlen else "sdpa"):
            hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=attention_mask, use_cache=False,
                                        **varlen).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        return hidden if head_fn is None else head_fn(hidden, *self.head())


def shard(policy, mode):
    """The policy for the ranks of the default process group: "ddp" (replicas, gradients all-reduced) or "fsdp"
    (FSDP2's fully_shard on each decoder layer and on the whole: parameters, gradients and
    optimizer state sharded, each layer gathered for its forward and backward)."""
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(policy)
    from torch.distributed.fsdp import fully_shard
    for layer in getattr(policy.lm.base_model, "layers", []):
        fully_shard(layer)
    fully_shard(policy)
    return policy
