"""The thin trainer: learning, layouts, resume, flags, data parallel."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers", reason="the trainer is the [train] extra")

import tic_kernels as tk  # noqa: E402
from tic_kernels import train  # noqa: E402
from tic_kernels.ops import lm_head as linear  # noqa: E402
from tic_kernels.ops import lm_head_loss  # noqa: E402
from tic_kernels.train.attention import attention, register_varlen_attention  # noqa: E402

FAST = ["--prompts", "8", "--group", "4", "--quiet", "--save-every", "0"]


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    # The trainer runs on CPU tensors: the kernels' CPU path is the reference; the interpreter
    # would only make these tests slow (the kernels have their own tests).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _args(tmp_path, *extra):
    p = train.parser()
    args = p.parse_args(["--out", str(tmp_path), *FAST, *extra])
    train.check_args(p, args)
    return args


def _mean(log, key, sl):
    vals = [r[key] for r in log[sl]]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("algo,layout", [("tic", "padded"), ("grpo", "padded"),
                                         ("gspo", "padded"), ("no_is", "padded"),
                                         ("tic", "packed")])
def test_reward_improves(algo, layout, tmp_path):
    log, _ = train.run(_args(tmp_path, "--algo", algo, "--steps", "70", "--seed", "1",
                             "--prompts", "16", "--group", "8", "--layout", layout))
    first, last = _mean(log, "reward", slice(0, 10)), _mean(log, "reward", slice(-10, None))
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoint" / "trainer_state.pt").exists()


def test_packed_and_padded_give_the_same_loss():
    task = train.CountingTask()
    args = train.parser().parse_args(["--layers", "2"])
    lm = train.build_model(args, task)
    register_varlen_attention()
    policy = train.LossRowsLM(lm)
    g = torch.Generator().manual_seed(0)
    # uneven completions (some stop early at EOS) and left-padded prompts of two lengths
    prompts = task.sample_prompts(6, g)
    prompts[::2] = [[task.eq] + p for p in prompts[::2]]
    ids, attn, comp, _, _ = train.sample(policy, task, prompts, 3, 1.5, g)
    adv = torch.randn(ids.shape[0], generator=g)
    losses, grads = [], []
    for layout in ("packed", "padded"):
        lm.zero_grad()
        inputs, targets, kw = train.loss_view(ids, attn, comp, layout)
        hidden = train.view_rows(policy(**inputs), kw)
        weight, bias = policy.head()
        logits = torch.nn.functional.linear(hidden, weight, bias)
        old = tk.token_logprobs(logits.detach(), targets) + 0.05
        out = tk.tic_loss(logits, targets, old, adv, **kw)
        fused = tk.linear_tic_loss(hidden.detach(), weight.detach(), targets, old, adv,
                                   bias=bias, chunk_size=7, **kw)
        torch.testing.assert_close(fused.loss, out.loss, atol=1e-6, rtol=1e-5)
        out.loss.backward()
        losses.append(out.loss)
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_varlen_attention_matches_packed_sdpa():
    """The tic_varlen attention separates packed sequences exactly like sdpa over the
    block-diagonal mask transformers builds from restarting position ids."""
    from transformers import LlamaConfig, LlamaForCausalLM
    register_varlen_attention()
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    lm = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 16, (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    want = lm(ids, position_ids=pos, use_cache=False).logits
    with attention(lm, "tic_varlen"):
        got = lm(ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=4, max_length_k=4).logits
    torch.testing.assert_close(got, want)
    assert lm.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_amp_bf16_steps(layout, tmp_path, monkeypatch):
    """--amp bf16: the forward and the fused LM head run in bf16 (on CUDA the packed layout
    then uses the varlen flash kernels); two steps train with finite losses."""
    dtypes, autocast = [], linear.autocast_inputs

    def recording(*args):
        out = autocast(*args)
        dtypes.append(tuple(t.dtype for t in out[:2]))
        return out
    monkeypatch.setattr(linear, "autocast_inputs", recording)  # linear_token_logprobs
    monkeypatch.setattr(lm_head_loss, "autocast_inputs", recording)  # linear_tic_loss
    log, lm = train.run(_args(tmp_path, "--amp", "bf16", "--steps", "2", "--layout", layout))
    assert set(dtypes) == {(torch.bfloat16, torch.bfloat16)} and len(dtypes) == 6  # 2 steps x (old + mu = 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert all(p.dtype == torch.float32 for p in lm.parameters())


def test_varlen_kernels_only_for_half_precision():
    """flash-attn's and torch's varlen kernels take fp16/bf16 only: the trainer's default fp32
    model on CUDA takes the per-sequence sdpa path (tested above on the CPU) instead of
    failing at step 1."""
    from tic_kernels.train.attention import varlen_kernel_applies
    assert varlen_kernel_applies("cuda", torch.bfloat16)
    assert varlen_kernel_applies("cuda", torch.float16)
    assert not varlen_kernel_applies("cuda", torch.float32)
    assert not varlen_kernel_applies("cpu", torch.bfloat16)


def test_resume_continues_identically(tmp_path):
    straight, lm_a = train.run(_args(tmp_path / "a", "--steps", "6"))
    train.run(_args(tmp_path / "b", "--steps", "3"))
    resumed, lm_b = train.run(_args(tmp_path / "b", "--steps", "6", "--resume"))
    keys = ("reward", "loss", "clip_fraction", "ratio_mean")
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]
    for a, b in zip(lm_a.parameters(), lm_b.parameters()):
        assert torch.equal(a, b)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_after_a_crash_mid_checkpoint(tmp_path, monkeypatch):
    """A run killed while its checkpoint's weights were half written resumes from the previous
    checkpoint, and continues as a run that never crashed (tic_kernels.train.checkpoint)."""
    from tic_kernels.train import checkpoint
    straight, _ = train.run(_args(tmp_path / "a", "--steps", "4"))
    train.run(_args(tmp_path / "b", "--steps", "2"))

    def killed(what):
        if what == "model":
            for f in (tmp_path / "b" / "checkpoint.new").glob("*.safetensors"):
                f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
            raise KeyboardInterrupt("killed while writing the checkpoint")
    monkeypatch.setattr(checkpoint, "_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train.run(_args(tmp_path / "b", "--steps", "3", "--resume"))
    monkeypatch.setattr(checkpoint, "_step", lambda what: None)
    resumed, _ = train.run(_args(tmp_path / "b", "--steps", "4", "--resume"))
    keys = ("reward", "loss", "clip_fraction", "ratio_mean")
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]


@pytest.mark.parametrize("flags,msg", [
    (["--group", "1"], "--group must be >= 2"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--hidden", "30"], "--hidden must be a multiple of 4"),
    (["--algos", "tic,ppo"], "unknown \\['ppo'\\]"),
    (["--model", "/no/such/dir"], "--model must be a local directory"),
    (["--algo", "ppo"], "invalid choice: 'ppo'"),
    (["--layout", "ragged"], "invalid choice: 'ragged'"),
    (["--clip", "lower"], "invalid choice: 'lower'"),
    (["--eps-high", "-0.1"], "--eps-high must be a finite number >= 0"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_flags(flags, msg, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)


def test_bad_task_and_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--task must look like"):
        train.run(_args(tmp_path, "--task", "nocolon"))
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        train.run(_args(tmp_path / "empty", "--resume"))


@pytest.mark.parametrize("flags, want", [
    (["--algo", "tic"], dict(ratio="trajectory", clip_mode="upper", eps_low=0.2, eps_high=0.28,
                             length_normalize=True)),
    (["--algo", "tic", "--clip", "two_sided", "--no-length-normalize", "--eps-high", "0.3"],
     dict(ratio="trajectory", clip_mode="two_sided", eps_low=0.2, eps_high=0.3,
          length_normalize=False)),
    (["--algo", "tic-two-sided"], dict(ratio="trajectory", clip_mode="two_sided", eps_low=0.2,
                                       eps_high=0.28, length_normalize=True)),
    (["--algo", "tic-no-length-norm"], dict(ratio="trajectory", clip_mode="upper",
                                            eps_low=0.2, eps_high=0.28,
                                            length_normalize=False)),
    (["--algo", "grpo", "--length-normalize"], dict(ratio="token", clip_mode="two_sided",
                                                    eps_low=0.2, eps_high=0.28,
                                                    length_normalize=True)),
    (["--algo", "no_is", "--clip", "upper"], dict(ratio="none", length_normalize=False)),
])
def test_the_metrics_log_records_the_resolved_keywords(flags, want, tmp_path):
    log, _ = train.run(_args(tmp_path, "--steps", "2", *flags))
    assert [r["loss_keywords"] for r in log] == [want, want]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["loss_keywords"] == want


def test_long_counting_task_rewards_exactly():
    task = train.TASKS["long_counting"]()
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    for p in task.sample_prompts(20, g):
        d = p[1]  # digits are their own ids
        right = [(d + k) % 10 for k in range(1, 21)] + [task.eos_id]
        assert task.answer(p) == right and task.max_new_tokens == 21
        assert task.reward(p, right) == 1.0
        assert task.reward(p, right[:10]) == pytest.approx(10 / 21)  # partial credit
        wrong = right.copy()
        wrong[3] = (wrong[3] + 1) % 10
        assert task.reward(p, wrong) == pytest.approx(3 / 21)  # right up to the mistake
        assert task.reward(p, right + [5, 5]) == 1.0  # nothing is read after EOS
        assert task.reward(p, [task.eos_id]) == 0.0


def test_long_counting_task_trains(tmp_path):
    log, _ = train.run(_args(tmp_path, "--task", "long_counting", "--steps", "2"))
    assert len(log) == 2 and 0.0 <= log[-1]["reward"] <= 1.0


def test_compare_writes_csv_plot_and_summary(tmp_path):
    runs = train.compare(_args(tmp_path, "compare", "--algos", "tic,grpo", "--seeds", "2",
                               "--steps", "3", "--jobs", "2"))
    assert {k: len(v) for k, v in runs.items()} == {"tic": 2, "grpo": 2}
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("algo,seed,step,reward") and len(rows) == 1 + 2 * 2 * 3
    table = (tmp_path / "summary.md").read_text()
    assert "| tic | 2 |" in table and "| grpo | 2 |" in table


def test_summary_statistics():
    from tic_kernels.train.compare import steps_to, summary
    log = [{"reward": r} for r in [0.0] * 10 + [1.0] * 10]
    assert steps_to(log, 0.6) == 16  # steps 7..16: six 1.0s and four 0.0s
    assert steps_to(log, 1.01) is None
    flat = [{"reward": 0.5}] * 20
    table = summary({"a": [log, flat], "b": [flat, flat, [{"reward": 0.2}] * 20]}, 0.6, last=5)
    # a: final rewards 1.0 and 0.5: mean 0.75, sample sd 0.354; one seed of two reaches 0.6
    assert "| a | 2 | 0.750 +- 0.354 | 0.500..1.000 | - | 16; 1/2 |" in table
    # b: 0.5, 0.5, 0.2: mean 0.4, sd 0.173; t = -0.35 / sqrt(0.173^2 / 3 + 0.354^2 / 2) = -1.3
    assert "| b | 3 | 0.400 +- 0.173 | 0.200..0.500 | -0.350 (-1.3) | never; 0/3 |" in table


def test_runs_come_back_from_the_csv(tmp_path):
    from tic_kernels.train.compare import runs_from_csv
    runs = train.compare(_args(tmp_path, "compare", "--algos", "grpo", "--seeds", "2",
                               "--steps", "2"))
    back = runs_from_csv(tmp_path / "compare.csv")
    assert [[r["reward"] for r in lg] for lg in back["grpo"]] == \
        [[round(r["reward"], 4) for r in lg] for lg in runs["grpo"]]


def test_custom_task_plugs_in(tmp_path, monkeypatch):
    mod = tmp_path / "my_task.py"
    mod.write_text(textwrap.dedent("""
        from tic_kernels.train import CountingTask
        class Short(CountingTask):
            def __init__(self):
                super().__init__(length=2)
        def make(tokenizer):
            return Short()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    log, _ = train.run(_args(tmp_path / "out", "--task", "my_task:make", "--steps", "2"))
    assert len(log) == 2


def _torchrun(script, *args, nproc=2, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), str(script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from transformers import LlamaForCausalLM
    from tic_kernels import train
    from tic_kernels.ranks import exit_process_group
    p = train.parser()
    args = p.parse_args(sys.argv[1:])
    log, lm = train.run(args)
    # the full weights: the replicas' (DDP) or the shards gathered (FSDP2), on every rank
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in lm.state_dict().items()}
    flat = torch.cat([v.detach().flatten() for v in full.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        saved = LlamaForCausalLM.from_pretrained(args.out + "/checkpoint").state_dict()
        with open(args.out + "/dist.json", "w") as f:
            json.dump({"same": all(torch.equal(gathered[0], g) for g in gathered),
                       "reloads": all(torch.equal(saved[k], v) for k, v in full.items()),
                       "steps": len(log), "world": dist.get_world_size()}, f)
    exit_process_group()
""")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_checkpoint_and_resume(mode, tmp_path):
    """Two gloo processes train, the ranks agree on the full weights, rank 0's checkpoint
    (save_pretrained of the full state dict) holds them, and a run resumes from it."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    flags = [*FAST, "--device", "cpu", "--layers", "1", "--hidden", "32"] + \
        (["--fsdp"] if mode == "fsdp" else [])
    _torchrun(script, "--out", tmp_path, "--steps", "2", *flags)
    out = json.loads((tmp_path / "dist.json").read_text())
    assert out == {"same": True, "reloads": True, "steps": 2, "world": 2}
    _torchrun(script, "--out", tmp_path, "--steps", "3", "--resume", *flags)
    out = json.loads((tmp_path / "dist.json").read_text())
    assert out == {"same": True, "reloads": True, "steps": 3, "world": 2}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


SHARD_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import tic_kernels as tk
    from tic_kernels import train
    from tic_kernels.layout import ignoring_masked
    from tic_kernels.train.loop import _full_state
    from tic_kernels.ranks import exit_process_group
    mode, out = sys.argv[1], sys.argv[2]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    task = train.CountingTask()
    lm = train.build_model(train.parser().parse_args(["--layers", "2", "--hidden", "32"]), task)
    policy = train.LossRowsLM(lm)
    # one fixed batch, the same in every process (the same seeded model and generator)
    g = torch.Generator().manual_seed(int(sys.argv[3]))
    ids, attn, comp, _, _ = train.sample(policy, task, task.sample_prompts(4, g), 4, 1.0, g)
    adv = tk.group_advantages(torch.rand(ids.shape[0], generator=g), 4)
    B = ids.shape[0]
    part = slice(rank * B // world, (rank + 1) * B // world)  # this process's share
    if world > 1:
        policy = train.shard(policy, mode)
    opt = torch.optim.SGD(lm.parameters(), lr=0.5)
    inputs, targets, kw = train.loss_view(ids[part], attn[part], comp[part], "padded")
    with torch.no_grad():
        old = policy(**inputs, head_fn=lambda h, w, b: tk.linear_token_logprobs(
            train.view_rows(h, kw), w, ignoring_masked(targets, kw["mask"]), bias=b))
    # ratios away from 1 at the start: noise drawn for the whole batch, then this share's
    noise = torch.randn(train.loss_view(ids, attn, comp, "padded")[1].shape, generator=g)
    old = old + 0.1 * noise[part]
    for _ in range(3):
        opt.zero_grad()
        o = policy(**inputs, head_fn=lambda h, w, b: tk.linear_tic_loss(
            train.view_rows(h, kw), w, targets, old, adv[part], bias=b,
            num_sequences=B // world, **kw))
        o.loss.backward()
        opt.step()
    state, _ = _full_state(lm, opt, mode == "fsdp" and world > 1)
    if rank == 0:
        torch.save(state, out)
    if world > 1:
        exit_process_group()
""")


def test_ddp_and_fsdp_match_one_process_on_the_combined_batch(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    seed = str(int(torch.randint(0, 1 << 30, ()).item()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script), "none", str(tmp_path / "one.pt"), seed],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    want = torch.load(tmp_path / "one.pt")
    for mode in ("ddp", "fsdp"):
        _torchrun(script, mode, tmp_path / f"{mode}.pt", seed)
        got = torch.load(tmp_path / f"{mode}.pt")
        assert got.keys() == want.keys()
        moved = 0
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4,
                                       msg=f"{mode}: {k}, seed {seed}")
            moved += int(not torch.equal(want[k], _initial(k)))
        assert moved > len(want) // 2  # the steps changed most tensors


def _initial(key, _cache={}):
    if not _cache:
        lm = train.build_model(train.parser().parse_args(["--layers", "2", "--hidden", "32"]),
                               train.CountingTask())
        _cache.update(lm.state_dict())
    return _cache[key]


def _local_model_dir(path):
    """A tiny Llama and a word-level tokenizer saved like a Hugging Face model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", "<pad>", "=", *map(str, range(10)), "x"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return fast


def test_local_model_directory(tmp_path):
    tok = _local_model_dir(tmp_path / "model")
    task = train.CountingTask(tokenizer=tok)
    assert task.digits == [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert (task.eos_id, task.pad_id, task.vocab_size) == (2, 3, 16)
    log, lm = train.run(_args(tmp_path / "out", "--model", str(tmp_path / "model"), "--steps", "3"))
    assert len(log) == 3 and all(0 <= r["reward"] <= 1 for r in log)
    assert lm.config.vocab_size == 16 and (tmp_path / "out" / "checkpoint" / "config.json").exists()
