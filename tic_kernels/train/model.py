"""The policy: a Hugging Face causal LM (a local directory, or a tiny Llama built from a
config), and the wrapper that returns the last hidden states of the loss rows, for the fused
LM head (tic_kernels.linear_tic_loss) to turn into the loss without the logits."""
from __future__ import annotations

import torch

from tic_kernels.attention import attention


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
    ``rows`` index the flattened hidden states."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def head(self):
        out = self.lm.get_output_embeddings()
        return out.weight, out.bias

    def forward(self, input_ids, rows, position_ids=None, attention_mask=None, **varlen):
        with attention(self.lm, "tic_varlen" if varlen else "sdpa"):
            hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids,
                                        attention_mask=attention_mask, use_cache=False,
                                        **varlen).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])[rows]
