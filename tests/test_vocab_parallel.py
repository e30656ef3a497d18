"""Op 7: the vocabulary split over 2 and 3 gloo processes gives the unsharded values and
gradients (each rank its slice), on both paths (the Triton kernels, under the interpreter on
the CPU, and the reference); and bad inputs make every rank raise instead of hanging in a
collective."""
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tic_kernels.backend import interpreting
from tic_kernels.testing import (GRAD_TOL, HEAD_GRAD_TOL, LOSS_TOL, VALUE_TOL,
                                 assert_close_to_scale, tolerance)

sys.path.insert(0, os.path.dirname(__file__))
import vocab_parallel_cases as cases  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 600  # the interpreter on 2 cores; a hang fails the test instead of the run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, args_of, timeout=TIMEOUT_S):
    """Runs ``world`` python processes (args_of(rank) after the interpreter) and returns their
    outputs; any that is still running after ``timeout`` seconds is killed and the test fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get(
        "PYTHONPATH")])), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, *args_of(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank did not finish within {timeout} s (a hang in a collective?)")
    for r, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{o}"
    return outs


def _check(name, got, want, dtype):
    if name.startswith("grad_hidden") or (name.startswith("grad_") and "linear" in name):
        assert_close_to_scale(got, want, 2 * HEAD_GRAD_TOL[dtype], name)
    elif name.startswith("grad_"):
        torch.testing.assert_close(got, want, **tolerance(GRAD_TOL, dtype), msg=name)
    elif name in ("logp", "entropy"):
        torch.testing.assert_close(got, want, **tolerance(VALUE_TOL, dtype), msg=name)
    else:
        torch.testing.assert_close(got, want, **tolerance(LOSS_TOL), msg=name)


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_unsharded(world, path, tmp_path, device, monkeypatch):
    if path == "kernels" and device == "cpu" and not interpreting():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    if path == "reference":
        if device == "cuda":
            pytest.skip("on CUDA tensors the kernels run; the reference is the CPU's path")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # here and in the ranks
    seed = random.randrange(1 << 30)  # fresh inputs each run; the seed is in the failure
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    _spawn(world, lambda r: [os.path.join(HERE, "vocab_parallel_cases.py"), str(r), str(world),
                             str(port), str(seed), device, outs[r]])
    want = cases.run_cases(seed, device)
    for r in range(world):
        got = torch.load(outs[r])
        assert got.keys() == want.keys()
        cols = cases._cols(r, world)
        for case, values in want.items():
            dtype = torch.bfloat16 if "bfloat16" in case else torch.float32
            for k, w in values.items():
                if k in cases.SHARDED_LAST:
                    w = w[..., cols]
                elif k in cases.SHARDED_FIRST:
                    w = w[cols]
                _check(f"{k} of {case}, rank {r}/{world}, seed {seed}", got[case][k], w, dtype)


_ERRORS = textwrap.dedent("""
    import gc, sys, weakref, torch, torch.distributed as dist
    import tic_kernels as tk
    from tic_kernels.ranks import exit_process_group
    gc.disable()  # what a rejected call leaves behind must be freed by reference counting
    rank, world, port, case = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    V = 8 + (rank if case == "uneven_vocab" else 0)
    logits = torch.randn(5, V)
    targets = torch.randint(0, 8 * world, (5,))
    if case == "target_out_of_range":
        targets[2] = 8 * world  # one past the whole vocabulary
    if case == "bad_dtype_on_one_rank" and rank == 1:
        logits = logits.to(torch.int64)
    if case == "rows_differ" and rank == 0:
        logits, targets = logits[:4], targets[:4]
    try:
        tk.token_logprobs(logits, targets, process_group=dist.group.WORLD)
        print("NO ERROR")
    except (TypeError, ValueError) as e:
        print(type(e).__name__, e)
    alive = weakref.ref(logits)
    del logits
    print("freed", alive() is None)
    # the group still works: nobody is left inside a collective
    x = torch.ones(1)
    dist.all_reduce(x)
    print("after", int(x.item()))
    exit_process_group()
""")


@pytest.mark.parametrize("case, every_rank, failing_rank", [
    ("uneven_vocab", "same number of vocabulary columns", None),
    ("target_out_of_range", "targets must lie in [0, 16)", None),
    ("bad_dtype_on_one_rank", "another rank's inputs were rejected", "logits must be a floating"),
    ("rows_differ", "the row counts range from 4 to 5", None),
])
def test_bad_inputs_raise_on_every_rank(case, every_rank, failing_rank, tmp_path):
    script = tmp_path / "errors.py"
    script.write_text(_ERRORS)
    port = _free_port()
    outs = _spawn(2, lambda r: [str(script), str(r), "2", str(port), case], timeout=120)
    for r, out in enumerate(outs):
        want = failing_rank if failing_rank and r == 1 else every_rank
        assert want in out, f"rank {r}:\n{out}"
        assert "NO ERROR" not in out and "after 2" in out, f"rank {r}:\n{out}"
        # no reference cycle holds the caller's tensors (or the group) after the error
        assert "freed True" in out, f"rank {r}:\n{out}"


def test_process_group_must_be_a_group():
    import tic_kernels as tk
    with pytest.raises((TypeError, RuntimeError), match="process_group"):
        tk.token_logprobs(torch.randn(3, 5), torch.zeros(3, dtype=torch.long),
                          process_group="world")


def _agreement_run(path, monkeypatch):
    """Each rank's lines, split into {"disagree": [...], "unowned": [...]} (the agreed call's
    line ends the second)."""
    if path == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the ranks take the reference
    elif not interpreting():
        pytest.skip("the kernels run on the CPU only under TRITON_INTERPRET=1")
    port = _free_port()
    outs = _spawn(2, lambda r: [os.path.join(HERE, "vocab_parallel_agreement.py"), str(r), "2",
                                str(port)], timeout=300)
    ranks = []
    for out in outs:
        parts, which = {}, None
        for line in out.splitlines():
            if line.startswith("cases: "):
                which = line.split()[1]
                parts[which] = []
            elif line.count("\t") == 2:
                parts[which].append(line.split("\t"))
        ranks.append(parts)
    return ranks


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_ranks_that_disagree_raise_and_unowned_targets_are_nan(path, monkeypatch):
    """An option or replicated input that differs between ranks (entropy on one rank only,
    another chunk plan, mask, dtype, cu_seqlens, targets, ...) is a ValueError naming it on
    every rank, not an abort inside gloo or a hang; the group stays usable and an agreed call
    runs after them. Then, with the value checks off, a target outside the whole vocabulary
    gives NaN in every op that takes process_group (op 1's rule), never a plausible finite
    log-prob. (One pair of processes for both: each start costs seconds.)"""
    import vocab_parallel_agreement as agreement
    want = [name for name, _ in agreement._disagreements(0, None, path)]
    runs = _agreement_run(path, monkeypatch)
    for r, parts in enumerate(runs):
        lines = parts["disagree"]
        assert [line[0] for line in lines] == want, lines
        for name, (case, kind, message) in zip(want, lines):
            named = message.startswith("process_group:") and name in message if name.startswith(
                "different") else message.startswith(name)
            assert kind == "ValueError" and named, (r, name, kind, message)
    for r, parts in enumerate(runs):
        lines = parts["unowned"]
        assert lines[-1][:2] == ["agreed", "OK"], lines
        got = {case: message.split() for case, kind, message in lines if kind == "OK"}
        assert set(got) == {"token_logprobs", "linear_token_logprobs", "tic_loss",
                            "linear_tic_loss", "agreed"}, lines
        for op in ("token_logprobs", "linear_token_logprobs"):
            values = [float(v) for v in got[op]]
            assert [v != v for v in values] == [False, True, False, False, True, False], (r, op)
            assert all(v < 0 for i, v in enumerate(values) if i not in (1, 4)), (r, op, values)
        for op in ("tic_loss", "linear_tic_loss"):
            assert got[op] == ["nan"], (r, op, got[op])


def test_fingerprint_tells_apart_what_a_plain_residue_would_not():
    """The agreement's tensor fingerprint: equal for the same values in another integer dtype
    (or a bool mask and its 0/1 copy), different for values a sum of bit patterns mod 2^31 - 1
    would confuse (x and -nextafter(x); ids 2^31 - 1 apart), a swap, or another length."""
    from tic_kernels.ranks import fingerprint
    x = torch.tensor([0.5, 1.0, -2.0])
    y = x.clone()
    y[1] = -torch.nextafter(x[1], torch.tensor(float("inf")))
    ids = torch.tensor([5, 7, 9])
    mask = torch.tensor([True, False, True])
    assert fingerprint(ids) == fingerprint(ids.int())
    assert fingerprint(mask) == fingerprint(mask.to(torch.uint8))
    for a, b in [(x, y), (ids, ids + torch.tensor([2 ** 31 - 1, 0, 0])), (ids, ids.flip(0)),
                 (ids, ids[:2]), (x, x.double()), (torch.zeros(0), torch.zeros(1))]:
        assert fingerprint(a) != fingerprint(b), (a, b)
