"""The trainer's checkpoints (tic_kernels.train.checkpoint): a crash at any step of a write,
or in the middle of writing the weights, leaves a whole checkpoint to resume from, old or new;
resuming never runs code pickled into a trainer state."""
import os
import pickle

import pytest
import torch

from tic_kernels.train import checkpoint

STEPS = ["model", "state", "retired", "moved", "cleaned"]


class Crash(Exception):
    pass


def _save_model(step, half=False):
    """A save_pretrained stand-in: a weights file whose contents name the step."""
    def save(path):
        data = torch.full((64,), float(step)).numpy().tobytes()
        with open(path / "model.safetensors", "wb") as f:
            f.write(data[:len(data) // 2] if half else data)
        if half:
            raise Crash("killed while writing the weights")
    return save


def _state(step):
    return {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}},
            "python_rng": (3, tuple(range(5)), None), "log": [{"reward": 0.5, "algo": "tic"}]}


def _resumable_step(out):
    """The step of the checkpoint a resume would load, checking its files agree."""
    path = checkpoint.latest(out)
    assert path is not None, sorted(os.listdir(out))
    state = checkpoint.load_state(path)
    weights = (path / "model.safetensors").read_bytes()
    assert len(weights) == 64 * 4, "a truncated weights file"
    assert torch.frombuffer(bytearray(weights), dtype=torch.float32).eq(state["step"]).all()
    return state["step"]


@pytest.mark.parametrize("crash_after", STEPS + ["weights half written"])
def test_a_write_interrupted_at_any_step_still_resumes(crash_after, tmp_path, monkeypatch):
    checkpoint.write(tmp_path, _save_model(1), _state(1))
    assert _resumable_step(tmp_path) == 1

    def step(what):
        if what == crash_after:
            raise Crash(what)
    monkeypatch.setattr(checkpoint, "_step", step)
    half = crash_after == "weights half written"
    with pytest.raises(Crash):
        checkpoint.write(tmp_path, _save_model(2, half), _state(2))
        if crash_after == "cleaned":  # the last step: nothing left to interrupt
            raise Crash("done")
    got = _resumable_step(tmp_path)
    # the new checkpoint once it is whole (its state written), the old one before
    assert got == (1 if crash_after in ("model", "weights half written") else 2), got
    # the next write (after a resume) starts from there and leaves one checkpoint in place
    monkeypatch.setattr(checkpoint, "_step", lambda what: None)
    checkpoint.write(tmp_path, _save_model(3), _state(3))
    assert _resumable_step(tmp_path) == 3
    assert sorted(os.listdir(tmp_path)) == [checkpoint.NAME]


def test_a_second_crash_while_settling_keeps_the_newest(tmp_path, monkeypatch):
    """Crashed between retiring the old checkpoint and moving the new one in, then crashed
    again in the next write: the checkpoint of the first write is still there."""
    checkpoint.write(tmp_path, _save_model(1), _state(1))
    for crash_at in ("retired", "model"):
        def step(what, crash_at=crash_at):
            if what == crash_at:
                raise Crash(what)
        monkeypatch.setattr(checkpoint, "_step", step)
        with pytest.raises(Crash):
            checkpoint.write(tmp_path, _save_model(2 if crash_at == "retired" else 3),
                             _state(2 if crash_at == "retired" else 3))
        assert _resumable_step(tmp_path) == 2


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_resume_refuses_a_state_that_pickles_code(tmp_path, monkeypatch):
    ckpt = tmp_path / checkpoint.NAME
    ckpt.mkdir()
    with open(ckpt / checkpoint.STATE, "wb") as f:
        pickle.dump({"step": 1, "evil": _Payload()}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="refused"):
        checkpoint.load_state(ckpt)
    assert not (tmp_path / "PWNED").exists()
