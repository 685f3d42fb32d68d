"""Train many tiny layouts in one process group and record their per-step losses (run under torchrun, or alone).

Every launch costs several seconds of imports on a 2-core machine, so one launch runs a whole suite: the cases
below share the process group, and each builds a fresh :class:`Trainer` (megatron's model-parallel state is
re-initialised for its layout). Rank 0 writes ``{case: {"losses": [...], ...}}`` as JSON.

    python -m torch.distributed.run --nproc-per-node 2 run_cases.py world2 OUT.json
    python run_cases.py reference OUT.json --checkpoints DIR   # single process: references + reshard resumes

Suites:
    reference  one process: the single-process losses of every variant (the ground truth), and resumes of the
               TP=2 / PP=2 checkpoints written by ``world2`` into the TP=1 / PP=1 layout.
    world2     two processes: TP=2 (+SP), PP=2 (+interleaving), DP=2 with both backends (megatron with and
               without the distributed optimizer, DeepSpeed ZeRO-1 and ZeRO-2), activation recomputation, and
               save-at-half / resume-in-the-same-layout runs; writes the reshard checkpoints.
    world4     four processes: TP=2 x PP=2 and DP=2 x TP=2 / DP=2 x PP=2 with both backends.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import importlib.util

import torch.distributed as dist

from elas_megatron.data.synthetic import SyntheticTokens

STEPS = 5
# world2 runs under TRITON_INTERPRET=1 (set by the test) so that model.rope_backend=triton runs on CPU tensors;
# nothing else uses Triton on CPU (the ELAS core's auto backend is the reference there).
HAVE_TRITON = importlib.util.find_spec("triton") is not None
VARIANTS = ("dense", "cola", "elas")
SEQ_LEN, VOCAB = 16, 128
BASE = [
    "model.hidden_size=32", "model.num_layers=4", "model.num_heads=4", "model.ffn_hidden_size=64", "model.rank=8",
    f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ_LEN}", "train.global_batch=8", "train.micro_batch=2",
    f"train.steps={STEPS}", "train.seed=1234", "train.eval_iters=1", "optim.lr=1e-2", "optim.warmup_steps=1",
    "checkpoint.save_final=false", "checkpoint.keep_last=0", "log.level=warning",
]

DS1 = ["parallel.optimizer=deepspeed", "parallel.zero_stage=1"]
DS2 = ["parallel.optimizer=deepspeed", "parallel.zero_stage=2"]
DISTOPT = ["parallel.zero_stage=1"]  # megatron's distributed optimizer


def _cases_world2() -> dict[str, list[str]]:
    cases = {}
    for v in VARIANTS:
        var = [f"model.variant={v}"]
        cases[f"{v}/tp2"] = var + ["parallel.tp=2"]
        cases[f"{v}/tp2-sp"] = var + ["parallel.tp=2", "parallel.sequence_parallel=true"]
        cases[f"{v}/pp2"] = var + ["parallel.pp=2"]
        cases[f"{v}/pp2-vpp2"] = var + ["parallel.pp=2", "parallel.vpp=2"]
        cases[f"{v}/dp2-megatron"] = var
        cases[f"{v}/dp2-megatron-distopt"] = var + DISTOPT
        cases[f"{v}/dp2-deepspeed-z1"] = var + DS1
        cases[f"{v}/dp2-deepspeed-z2"] = var + DS2
        cases[f"{v}/tp2-recompute-full"] = var + ["parallel.tp=2", "parallel.recompute=full"]
        cases[f"{v}/pp2-recompute-selective"] = var + ["parallel.pp=2", "parallel.recompute=selective"]
        cases[f"{v}/dp2-deepspeed-z2-recompute-ffn"] = var + DS2 + ["parallel.recompute=ffn"]
        cases[f"{v}/pp2-deepspeed-z1-recompute-full"] = var + DS1 + ["parallel.pp=2", "parallel.recompute=full"]
        # The fused RoPE kernel on TP shards + SP, for the ELAS model only: under Triton's interpreter (CPU) one
        # such case costs ~45 s on 2 cores, a third of this suite. Every variant rotates q/k in the same module
        # (layers/attention.py ElasSelfAttention), so one variant proves the kernel on TP head shards;
        # tests/unit/kernels/test_rope.py holds the kernel against megatron's RoPE.
        if HAVE_TRITON and v == "elas":
            cases[f"{v}/tp2-sp-rope-triton"] = var + ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                      "model.rope_backend=triton"]
    return cases


def _cases_world4() -> dict[str, list[str]]:
    cases = {}
    for v in VARIANTS:
        var = [f"model.variant={v}"]
        cases[f"{v}/tp2xpp2"] = var + ["parallel.tp=2", "parallel.pp=2"]
        cases[f"{v}/tp2xpp2-sp-recompute-full"] = var + ["parallel.tp=2", "parallel.pp=2",
                                                         "parallel.sequence_parallel=true", "parallel.recompute=full"]
        cases[f"{v}/dp2xtp2-megatron-distopt"] = var + DISTOPT + ["parallel.tp=2"]
        cases[f"{v}/dp2xtp2-deepspeed-z2"] = var + DS2 + ["parallel.tp=2"]
        cases[f"{v}/dp2xpp2-deepspeed-z1"] = var + DS1 + ["parallel.pp=2"]
    return cases


# Cases that train fewer than STEPS steps (compared with the reference's first steps): under Triton's interpreter
# a step of the fused-RoPE case costs ~9 s on 2 cores, and a wrong rotation moves the loss at step 2 already.
SHORT = {"elas/tp2-sp-rope-triton": 2}

# Save after half the steps, then a new Trainer resumes in the same layout and finishes (exact resume).
RESUME_SAME_LAYOUT = {
    "dense/dp2-megatron": "resume/dp2-megatron",
    "elas/dp2-megatron-distopt": "resume/dp2-megatron-distopt",
    "dense/dp2-deepspeed-z1": "resume/dp2-deepspeed-z1",
    "elas/dp2-deepspeed-z2": "resume/dp2-deepspeed-z2",
}
# Checkpoints written by world2 and resumed by the reference suite in the single-process layout.
RESHARD = {"elas/tp2": "reshard/tp2-to-tp1", "elas/pp2": "reshard/pp2-to-pp1",
           "cola/pp2-vpp2": "reshard/pp2-vpp2-to-pp1", "dense/tp2-sp": "reshard/tp2-sp-to-tp1"}
SAVE_STEP = 2


def _datasets():
    ds = SyntheticTokens(num_samples=4096, seq_len=SEQ_LEN, vocab_size=VOCAB)
    return ds, ds


def _config(overrides: list[str], run_dir: Path, world_size: int):
    from elas_megatron.config.loader import load_config

    return load_config(None, BASE + overrides + [f"train.run_dir={run_dir}"], world_size=world_size)


def _train(trainer, until: int) -> list[float]:
    losses = []
    while trainer.step < until:
        loss, _ = trainer.train_step()
        losses.append(loss)
    return losses


def _close(trainer) -> None:
    trainer.backend.close()


def run_case(name: str, overrides: list[str], work: Path, world_size: int, *, save_at: int | None = None) -> dict:
    from elas_megatron.training.trainer import Trainer

    start = time.perf_counter()
    cfg = _config(overrides, work / name.replace("/", "_"), world_size)
    trainer = Trainer(cfg, datasets=_datasets())
    losses = _train(trainer, save_at or SHORT.get(name, STEPS))
    saved = None
    if save_at is not None:
        saved = str(trainer.save())
        losses += _train(trainer, STEPS)
    _close(trainer)
    return {"losses": losses, "seconds": time.perf_counter() - start, "checkpoint": saved}


def run_resume(name: str, overrides: list[str], work: Path, world_size: int) -> dict:
    """Train SAVE_STEP steps, save, then continue in a NEW Trainer that resumes from the checkpoint."""
    from elas_megatron.training.trainer import Trainer

    run_dir = work / name.replace("/", "_")
    first = Trainer(_config(overrides, run_dir, world_size), datasets=_datasets())
    losses = _train(first, SAVE_STEP)
    first.save()
    _close(first)
    second = Trainer(_config(overrides, run_dir, world_size), resume=True, datasets=_datasets())
    assert second.step == SAVE_STEP, second.step
    losses += _train(second, STEPS)
    _close(second)
    return {"losses": losses}


def run_reshard(name: str, checkpoint: str, variant: str, work: Path) -> dict:
    """Load a checkpoint of another layout into the single-process layout and finish the run."""
    from elas_megatron.training.trainer import Trainer

    trainer = Trainer(_config([f"model.variant={variant}"], work / name.replace("/", "_"), 1), datasets=_datasets())
    trainer.load(Path(checkpoint))
    assert trainer.step == SAVE_STEP, trainer.step
    losses = _train(trainer, STEPS)
    _close(trainer)
    return {"losses": losses, "from": checkpoint}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=["reference", "world2", "world4"])
    parser.add_argument("out", help="JSON file written by rank 0")
    parser.add_argument("--checkpoints", help="world2: where the reshard checkpoints go; reference: read them")
    parser.add_argument("--only", help="run only cases whose name contains this string")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    out = Path(args.out)
    work = out.parent / f"work_{args.suite}"
    results: dict = {}

    if args.suite == "reference":
        for v in VARIANTS:
            results[f"{v}/reference"] = run_case(f"{v}/reference", [f"model.variant={v}"], work, 1)
        if args.checkpoints:
            saved = json.loads(Path(args.checkpoints, "checkpoints.json").read_text())
            for source, name in RESHARD.items():
                results[name] = run_reshard(name, saved[source], source.split("/")[0], work)
    else:
        cases = _cases_world2() if args.suite == "world2" else _cases_world4()
        if args.only:
            cases = {k: v for k, v in cases.items() if args.only in k}
        ckpt_root = Path(args.checkpoints) if args.checkpoints else work
        for name, overrides in cases.items():
            save_at = SAVE_STEP if name in RESHARD else None
            extra = [f"checkpoint.dir={ckpt_root / name.replace('/', '_')}"] if save_at else []
            results[name] = run_case(name, overrides + extra, work, world_size, save_at=save_at)
            if name in RESUME_SAME_LAYOUT:
                results[RESUME_SAME_LAYOUT[name]] = dict(run_resume(RESUME_SAME_LAYOUT[name], overrides, work,
                                                                    world_size), like=name)
        if args.suite == "world2" and args.checkpoints and dist.get_rank() == 0:
            saved = {name: r["checkpoint"] for name, r in results.items() if r.get("checkpoint")}
            Path(args.checkpoints, "checkpoints.json").write_text(json.dumps(saved, indent=1))

    if not dist.is_initialized() or dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
    from elas_megatron.parallel.setup import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
