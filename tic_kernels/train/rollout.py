"""Rollouts and their loss view: sampling completions, and the model inputs and tic_loss
layout of a batch, packed (varlen attention) or padded (sdpa)."""
from __future__ import annotations

import torch

from tic_kernels.ops.packing import pack


def _positions(attn):
    """Position ids that count only attended tokens (left padding starts at 0)."""
    return (attn.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(policy, task, prompts, group, temperature, generator):
    """G completions per prompt: (input_ids, attention_mask, completion_mask) (B, T), and the
    prompts and the completions as lists (one per row), from ``policy`` (a LossRowsLM, or it wrapped: called without loss
    rows it returns the next-token logits). Prompts are left-padded; a completion ends at
    EOS."""
    device = next(policy.parameters()).device
    prompts = [p for p in prompts for _ in range(group)]
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), task.pad_id, dtype=torch.long)
    attn = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    comp = torch.zeros_like(attn)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(task.max_new_tokens):
        pos = _positions(attn)
        logits = policy(input_ids=ids, attention_mask=attn, position_ids=pos)
        probs = torch.softmax(logits.float() / temperature, -1)
        # Drawn on the host with the CPU generator (reproducible on any device): one device-to-
        # host copy and sync per generated token, and the prompt recomputed each token (no KV
        # cache). Cheap for the built-in task's 5-token answers; a real rollout engine (vLLM,
        # SGLang) samples long completions.
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        live = ~done
        ids = torch.cat([ids, torch.where(live, nxt, task.pad_id)[:, None]], 1)
        attn = torch.cat([attn, live.long()[:, None]], 1)
        comp = torch.cat([comp, live.long()[:, None]], 1)
        done |= nxt == task.eos_id
    completions = [row[c.bool()].tolist() for row, c in zip(ids.cpu(), comp.cpu())]
    return ids, attn, comp, prompts, completions


def loss_view(ids, attn, comp, layout):
    """The model inputs and tic_loss layout for either layout (same tokens, same order)."""
    if layout == "packed":
        b = pack(ids, attn, comp)
        inputs = dict(input_ids=b.input_ids[None], position_ids=b.position_ids[None], rows=b.loss_rows,
                      cu_seq_lens_q=b.cu_seqlens, cu_seq_lens_k=b.cu_seqlens,
                      max_length_q=b.max_seqlen, max_length_k=b.max_seqlen)
        return inputs, b.loss_targets, dict(cu_seqlens=b.loss_cu_seqlens)
    B, T = ids.shape
    rows = torch.arange(B * T, device=ids.device).view(B, T)[:, :-1].reshape(-1)
    pos = _positions(attn)
    inputs = dict(input_ids=ids, attention_mask=attn, position_ids=pos, rows=rows)
    return inputs, ids[:, 1:], dict(mask=comp[:, 1:].bool())


def view_rows(x, layout_kw):
    """Per-row values of the loss rows (N, ...) shaped for the layout: (B, T - 1, ...) when
    padded."""
    if "mask" in layout_kw:
        B, T1 = layout_kw["mask"].shape
        return x.view(B, T1, *x.shape[1:])
    return x
