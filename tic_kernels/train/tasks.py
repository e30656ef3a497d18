"""Tasks: prompts, rewards and the vocabulary they need. A task is any object with
``sample_prompts(n, generator)``, ``reward(prompt, completion)``, ``max_new_tokens``, ``eos_id``
and ``pad_id`` (and ``vocab_size``, ``bos`` for the built-in model); ``--task module:factory``
names a factory called with the model's tokenizer."""
from __future__ import annotations

import importlib

import torch


class CountingTask:
    """Generated, exactly verifiable problems: the prompt is a digit d; the answer counts on,
    d+1, d+2, ... (mod 10), ``length`` digits, then EOS. Reward: the fraction of the answer's
    digits in the right place (and nothing after EOS). A random policy scores about 1/V."""

    def __init__(self, length=4, tokenizer=None):
        self.length = length
        self.max_new_tokens = length + 1
        if tokenizer is None:  # own vocabulary: 0-9, then BOS, '=', EOS, PAD
            self.digits = list(range(10))
            self.bos, self.eq, self.eos_id, self.pad_id = 10, 11, 12, 13
            self.vocab_size = 16
        else:
            def one(text):
                ids = tokenizer.encode(text, add_special_tokens=False)
                return ids[-1]
            self.digits = [one(str(d)) for d in range(10)]
            self.eq = one("=")
            self.eos_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
            self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eq
            self.vocab_size = len(tokenizer)

    def sample_prompts(self, n, generator):
        ds = torch.randint(0, 10, (n,), generator=generator).tolist()
        return [[self.bos, self.digits[d], self.eq] for d in ds]

    def answer(self, prompt):
        """The right completion of ``prompt``, EOS included."""
        d = self.digits.index(prompt[1])
        return [self.digits[(d + k) % 10] for k in range(1, self.length + 1)] + [self.eos_id]

    def reward(self, prompt, completion):
        want = self.answer(prompt)
        got = completion[: len(want)]
        return sum(int(a == b) for a, b in zip(got, want)) / len(want)


class LongCountingTask(CountingTask):
    """Long answers: the counting task with ``length`` = 20 digits (21 tokens with EOS).
    Reward: the fraction of the answer right before its first mistake (partial credit, exactly
    checked). Scoring every position instead left a tiny model at ~0.09 for 150 steps: the
    credit of one digit drowns in the noise of twenty; the prefix makes the first wrong digit
    the one that matters. The task where a per-token ratio and a trajectory ratio (a sum of
    21 token log-ratios) differ most."""

    def __init__(self, length=20, tokenizer=None):
        super().__init__(length, tokenizer)

    def reward(self, prompt, completion):
        want = self.answer(prompt)
        right = 0
        for got, expected in zip(completion, want):
            if got != expected:
                break
            right += 1
        return right / len(want)


TASKS = {"counting": CountingTask, "long_counting": LongCountingTask}  # --task NAME


def load_task(spec, tokenizer):
    if spec is None:
        return CountingTask(tokenizer=tokenizer)
    if spec in TASKS:
        return TASKS[spec](tokenizer=tokenizer)
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--task must look like 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(module), attr)(tokenizer)
