"""Benchmark of the logits -> loss path (forward, backward, forward+backward).

Providers: tic_kernels fused (and with inplace_backward), the reference, torch.compile of the
reference, and when they import: Liger-Kernel's Triton GRPO loss (token level = DAPO, sequence
level = GSPO), flash-attn's Triton cross_entropy followed by the loss in PyTorch (verl's path),
TRL's selective_log_softmax followed by the loss in PyTorch.

Byte model (minimum traffic over the (N, V) logits of s bytes each): forward N V s, backward
2 N V s (read logits, write gradient), forward+backward 3 N V s.

    python benchmarks/bench_tic_loss.py --device cuda --shapes 16384x151936 --dtypes bfloat16
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tic_kernels as tk  # noqa: E402
from tic_kernels import reference as ref  # noqa: E402
from tic_kernels.ops import tic_loss_two_pass as two_pass  # noqa: E402

OP = "tic_loss"
PASSES = ("fwd", "bwd", "fwd+bwd")


def providers(batch, mode, compiled=True):
    """name -> loss_fn(logits) -> scalar loss, for the providers that apply. ``compiled``
    adds torch.compile of the reference (30-60 s of compilation per mode: left out of --quick,
    and it graph-breaks on the reference's boolean indexing anyway)."""
    t, old, adv, mask = batch["targets"], batch["old"], batch["adv"], batch["mask"]
    kw = dict(mask=mask, **harness.loss_keywords(mode, batch))
    out = {
        "tic_kernels": lambda x: tk.tic_loss(x, t, old, adv, **kw).loss,
        "tic_kernels_inplace": lambda x: tk.tic_loss(x, t, old, adv, inplace_backward=True,
                                                     **kw).loss,
        "reference": lambda x: ref.tic_loss(x, t, old, adv, **kw).loss,
    }
    if mode in ("token", "none"):  # the gradient in the forward (two passes), when served
        def two_pass_loss(x):
            two_pass.ENABLED = True
            try:
                return tk.tic_loss(x, t, old, adv, **kw).loss
            finally:
                two_pass.ENABLED = False
        out["tic_kernels_two_pass"] = two_pass_loss
    if compiled:
        out["torch_compile_reference"] = torch.compile(
            lambda x: ref.tic_loss(x, t, old, adv, **kw).loss)

    def loss_from_logp(logp):
        return ref.tic_loss_from_logprobs(logp, old, adv, **kw).loss

    try:
        from trl.trainer.utils import selective_log_softmax
        out["trl_selective_log_softmax+torch"] = lambda x: loss_from_logp(selective_log_softmax(x, t))
    except Exception:
        pass
    fa_logp = harness.flash_attn_logprobs() if batch["logits"].is_cuda else None
    if fa_logp is not None:
        out["flash_attn_ce+torch"] = lambda x: loss_from_logp(fa_logp(x, t))
    level = {"token": "token", "sequence_mean": "sequence"}.get(mode)  # Liger: no op 4b
    if level is not None and batch["logits"].is_cuda:
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            def liger(x):
                # Liger takes (B, T + 1, V) and drops the last position itself
                loss, _ = triton_grpo_loss(x, old, None, t, adv, mask.int(), temperature=1.0,
                                           beta=0.0, eps_low=0.2, eps_high=0.28, inplace=False,
                                           loss_type="dapo" if level == "token" else "grpo",
                                           importance_sampling_level=level, reduce=True)
                return loss
            out[f"liger_grpo_{level}"] = liger
        except Exception:
            pass
    return out


def run(device, shapes, dtypes, modes, passes=PASSES, only=None, reps=None, save_as=None,
        compiled=True):
    """Records of every provider; with ``save_as=(out_dir, name)`` the JSON is rewritten after
    each provider, so a run cut short by a time limit keeps what it measured."""
    env = harness.environment(device)
    copy = harness.copy_bandwidth_gbps(device)
    records = [harness.record("copy", "torch.copy_", pass_="copy", shape={}, dtype="float32",
                              env=env) | {"gbps": round(copy, 1)}]
    print(f"# {env['device']}: device copy {copy:.0f} GB/s", flush=True)
    for N, V in shapes:
        for dtype in dtypes:
            batch = harness.make_batch(N, V, dtype, device)
            shape = {"N": N, "V": V}
            for mode in modes:
                want = harness.loss_and_grad(lambda x: ref.tic_loss(
                    x, batch["targets"], batch["old"], batch["adv"], mask=batch["mask"],
                    **harness.loss_keywords(mode, batch)).loss, batch["logits"])
                for name, fn in providers(batch, mode, compiled).items():
                    if only and name not in only:
                        continue
                    logits = batch["logits"]
                    if name.startswith("liger"):  # takes (B, T + 1, V), drops the last position
                        logits = torch.cat([logits, logits[:, :1]], 1)
                    recs = harness.bench_logits_provider(
                        OP, name, fn, logits, want, passes, shape=shape, dtype=dtype, mode=mode,
                        copy_gbps=copy, env=env, device=device, reps=reps)
                    harness.print_table(recs)
                    records += recs
                    if save_as:
                        harness.save(records, *save_as)
            batch = None  # free this shape's tensors before the next one is made
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="16384x151936", help="NxV,NxV,...")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--modes", default="token,trajectory",
                   help="ratios, each optionally with +sampler (op 4b: the sampler's log-probs)")
    p.add_argument("--providers", default=None, help="comma-separated subset")
    p.add_argument("--out", default=str(harness.ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="JSON file name (default: tic_loss_<device>)")
    args = p.parse_args(argv)
    recs = run(args.device, harness.parse_shapes(args.shapes),
               [getattr(torch, d) for d in args.dtypes.split(",")], args.modes.split(","),
               only=args.providers.split(",") if args.providers else None)
    path = harness.save(recs, args.out, args.name or f"{OP}_{torch.device(args.device).type}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
