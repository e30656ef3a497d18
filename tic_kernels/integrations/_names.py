"""Errors raised through an adapter, in the framework's words: the adapters call tic_kernels
with its own argument names, and re-raise its errors with the framework's names for them."""
from __future__ import annotations

import re


def renamer(names: dict):
    """A function that returns an exception like the one given, with each of tic_kernels'
    argument names in ``names`` replaced by the framework's (whole names only, never inside
    a longer name or a quoted value)."""
    pattern = re.compile(r"(?<![\w.'])(" + "|".join(sorted(map(re.escape, names), key=len,
                                                            reverse=True)) + r")(?![\w'])")

    def rename(error: Exception) -> Exception:
        return type(error)(pattern.sub(lambda m: names[m.group(1)], str(error)))
    return rename
