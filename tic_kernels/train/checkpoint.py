"""Checkpoints that a crash while writing cannot lose, and resuming without running pickled code.

A checkpoint is a directory ``<out>/checkpoint`` holding the model (``save_pretrained``) and
``trainer_state.pt`` (the step, the optimizer, the random states, the log). A new one is
written beside it, in ``checkpoint.new``, the trainer state last (through a temporary name,
so that its presence means everything before it is written), flushed to disk, and only then
moved into place: the old one is renamed to ``checkpoint.old``, the new one to
``checkpoint``, and the old one removed. A crash at any point leaves a whole checkpoint, old
or new, which ``latest`` finds; the next write first puts the newest whole one back in
place. The trainer state is loaded with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers of them, never arbitrary objects (a pickled call would run on load).
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch

NAME = "checkpoint"
STATE = "trainer_state.pt"


def _step(what: str) -> None:
    """Called after each step of ``write`` (the tests make it raise, to simulate a crash)."""


def _whole(path: Path) -> bool:
    return (path / STATE).is_file()


def _candidates(out: Path):
    """(in place, being written or moved in, being retired)."""
    return out / NAME, out / f"{NAME}.new", out / f"{NAME}.old"


def latest(out) -> Path | None:
    """The newest whole checkpoint under ``out``, or None: a whole ``.new`` is newer than the
    one in place, which is newer than a ``.old``."""
    final, new, old = _candidates(Path(out))
    for path in (new, final, old):
        if _whole(path):
            return path
    return None


def _settle(out: Path) -> None:
    """Finishes a move that a crash interrupted: the newest whole checkpoint in place, and no
    other left but a partial ``.new`` (which write removes)."""
    final, new, old = _candidates(out)
    newest = latest(out)
    if newest is not None and newest != final:
        if final.exists():
            if old.exists() and newest != old:
                shutil.rmtree(old)
            if newest != old:
                os.replace(final, old)
            else:
                shutil.rmtree(final)  # not whole: written in place by an older trainer
        os.replace(newest, final)
    if old.exists():
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(out, save_model, state: dict) -> Path:
    """Writes a checkpoint under ``out``: ``save_model(directory)`` writes the model files,
    ``state`` (plain data) becomes trainer_state.pt. Returns the checkpoint's path."""
    out = Path(out)
    final, new, old = _candidates(out)
    _settle(out)
    if new.exists():
        shutil.rmtree(new)  # a write that crashed before completing
    new.mkdir(parents=True)
    save_model(new)
    _step("model")
    tmp = new / f"{STATE}.tmp"
    torch.save(state, tmp)
    for f in new.iterdir():
        _fsync(f)
    os.replace(tmp, new / STATE)
    _fsync(new)
    _step("state")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        _step("retired")
    os.replace(new, final)
    _fsync(out)
    _step("moved")
    if old.exists():
        shutil.rmtree(old)
    _step("cleaned")
    return final


def load_state(path) -> dict:
    """trainer_state.pt of the checkpoint at ``path``, as plain data (weights_only=True)."""
    file = Path(path) / STATE
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(
            f"--resume: {file} holds objects other than tensors, numbers, strings and "
            f"containers of them, which loading would have to run as code: refused. A "
            f"checkpoint written by this trainer never does; if you trust where this one "
            f"came from, load it with torch.load(..., weights_only=False) yourself "
            f"({str(e).splitlines()[0]})") from None
