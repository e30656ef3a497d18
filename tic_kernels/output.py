"""What the losses return."""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import NamedTuple

import torch
import torch.utils._pytree


class LossOutput(NamedTuple):
    """``loss``: scalar float32 tensor with autograd. ``stats``: a mapping (a ``Stats`` on the
    kernels' path, a dict on the reference's) of detached float32 scalars, in sorted order:
    clip_fraction, ratio_mean, ratio_max, cap_fraction, delta_abs_mean, logp_mean, and
    entropy_mean (when entropy is computed) and kl_mean (when ref_logprobs is given); with a
    sampler correction (op 4b) rollout_is_mean, rollout_is_max, rollout_is_min,
    rollout_masked_fraction, rollout_ess, and rollout_kl (from rollout_logprobs)."""
    loss: torch.Tensor
    stats: MutableMapping


class Stats(MutableMapping):
    """A loss call's statistics by name, read like a dict: each value a detached 0-d float32
    tensor, a view of the one device tensor the loss kernel wrote. The views are made when a
    value is first read (at once, one op), not when the call returns: a training step that
    reads none of them pays no host time for them. Writing to it (``stats["loss"] = ...``)
    turns it into a plain dict inside first; ``dict(stats)`` makes one, and so does
    ``copy()``. It pickles (torch.save, and torch.load with weights_only=True: an allowed
    global) and flattens in torch's pytree as the dict it reads as. It is not a dict
    subclass: ``isinstance(stats, dict)`` is False, and json takes ``dict(stats)``."""
    __slots__ = ("_values", "_index", "_dict")

    def __init__(self, values=(), index=None, /, **named):
        """``values`` the kernel's statistics (detached) and ``index`` {name: its position in
        values}, in the order the names are listed; or, as dict() takes them, a mapping or
        pairs and names (how libraries that walk nested outputs, accelerate's gather for
        one, rebuild it)."""
        if index is None:
            self._values, self._index, self._dict = None, None, dict(values, **named)
        else:
            self._values, self._index, self._dict = values, index, None

    def _read(self) -> dict:
        if self._dict is None:
            views = self._values.unbind(0)  # (stats_dict hands them over detached)
            self._dict = {k: views[i] for k, i in self._index.items()}
        return self._dict

    def __getitem__(self, key):
        return self._read()[key]

    def __setitem__(self, key, value):
        self._read()[key] = value

    def __delitem__(self, key):
        del self._read()[key]

    def __iter__(self):
        return iter(self._index if self._dict is None else self._dict)

    def __len__(self):
        return len(self._index if self._dict is None else self._dict)

    def __contains__(self, key):
        return key in (self._index if self._dict is None else self._dict)

    def __repr__(self):
        return repr(self._read())

    def __reversed__(self):
        return reversed(self._read())

    def popitem(self):
        """The last pair, as a dict pops it."""
        return self._read().popitem()

    def __reduce__(self):  # pickled, and deep-copied, as the dict it reads as
        return Stats, (self._read(),)

    # what a dict offers beyond the mapping: its copies are plain dicts
    def copy(self) -> dict:
        return dict(self._read())

    __copy__ = copy

    def __or__(self, other):
        return {**self._read(), **other}

    def __ror__(self, other):
        return {**other, **self._read()}


def _flatten(stats):
    names = list(stats)
    return [stats[k] for k in names], names


torch.utils._pytree.register_pytree_node(
    Stats, _flatten, lambda values, names: Stats(zip(names, values)),
    serialized_type_name="tic_kernels.output.Stats")
torch.serialization.add_safe_globals([Stats])
