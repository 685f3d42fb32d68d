"""``elas-train CONFIG.yaml [MORE.yaml ...] [section.key=value ...] [--resume] [--dry-run]``: pretrain a model.

Several YAML files merge left to right (e.g. ``configs/c4.yaml configs/model/1b.yaml configs/variant/elas.yaml``);
``section.key=value`` overrides come last. This is also what torchrun launches.

Planning, without training: ``--dry-run [--world-size N] [--no-data-check] [--vocab-size V]`` validates the config
and layout and prints the report of :mod:`elas_megatron.cli.dryrun`; ``--print-config`` prints the resolved config
(every key, defaults included) as YAML. docs/configs.md tabulates the shipped configs.

Runs as-is under torchrun (it reads RANK/WORLD_SIZE/LOCAL_RANK). Exit codes, each failure printed as one line:

* 0 -- trained to ``train.steps``, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint (rerun with --resume);
* 2 -- ``elas-train: config error: ...`` / ``elas-train: error: ...``: a bad config, layout, data path or
  checkpoint, or a ``train.run_dir`` that cannot be written or is in use by another job (docs/reliability.md says
  what to do for each);
* 3 -- ``elas-train: numerical error: ...``: NaN/Inf or a loss spike beyond ``train.max_skipped_steps``, naming the
  step, rank(s) and layer; resume from the last checkpoint with a lower ``optim.lr`` or a larger skip budget;
* 124 -- a rank made no progress for ``parallel.distributed_timeout_s`` (the line names the stuck rank(s));
* 128 + N (143 for SIGTERM, 138 for SIGUSR1) -- ``elas-train: stopped by SIGTERM during start-up (PHASE) ...``: the
  signal arrived before the first step (nothing to save; whatever start-up was writing is completed or removed).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from elas_megatron.training.callbacks import Callback
from elas_megatron.utils.logging import open_rank_log

logger = logging.getLogger("elas_megatron")

EXIT_CONFIG = 2
EXIT_NUMERICAL = 3


class _RankLogFile(Callback):
    """Opens this rank's ``RUN_DIR/logs/rank{R}.log`` once the trainer holds the run directory (records logged
    before then are kept in memory and written first): a job refused because another one holds the directory
    writes nothing into it."""

    def on_model_built(self, trainer) -> None:
        open_rank_log()


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """``elas-train`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    ``callbacks``: :class:`~elas_megatron.training.callbacks.Callback` s handed to the trainer (for programs that
    wrap ``elas-train``, e.g. with instrumentation).
    """
    from dataclasses import fields

    from elas_megatron.config.schema import LogConfig

    parser = argparse.ArgumentParser(
        prog="elas-train", description=__doc__.splitlines()[0],
        epilog="Every config key, its default and its value after the YAML files and overrides: elas-train "
               "--print-config CONFIG.yaml ... (the fields are documented in elas_megatron/config/schema.py; the "
               "shipped configs are tabulated in docs/configs.md). Log options (docs/configs.md, "
               "docs/monitoring.md): " + ", ".join(f"log.{f.name}" for f in fields(LogConfig))
               + "; e.g. log.tensorboard=true (RUN_DIR/tensorboard), log.wandb_project=NAME (Weights & Biases; "
               "RUN_DIR/wandb), log.profile_steps=[10,12] (RUN_DIR/profile).")
    parser.add_argument("args", nargs="+", metavar="CONFIG.yaml | section.key=value",
                        help="YAML configs (merged left to right), then overrides such as train.steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    plan = parser.add_argument_group("planning (nothing is trained)")
    plan.add_argument("--dry-run", action="store_true",
                      help="validate config, layout and data; print parameter counts, steps/tokens and the memory "
                           "estimate per device (the device and dtype it assumes are stated); do not train")
    plan.add_argument("--world-size", type=int, default=None,
                      help="with --dry-run or --print-config: the planned number of processes (GPUs) of the run "
                           "(default $WORLD_SIZE, else 1)")
    plan.add_argument("--no-data-check", action="store_true",
                      help="with --dry-run: do not require the tokenizer and data files (the vocabulary then comes "
                           "from --vocab-size or model.vocab_size)")
    plan.add_argument("--vocab-size", type=int, default=None,
                      help="with --dry-run: the vocabulary size, instead of model.vocab_size or the tokenizer's")
    plan.add_argument("--print-config", action="store_true",
                      help="print the resolved config as YAML (every key, defaults included) and exit")
    args = parser.parse_intermixed_args(argv)
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be positive, got {args.world_size}")
    if not (args.dry_run or args.print_config):
        for flag, given in (("--world-size", args.world_size is not None), ("--no-data-check", args.no_data_check),
                            ("--vocab-size", args.vocab_size is not None)):
            if given:
                parser.error(f"{flag} is for planning: add --dry-run (training takes the world size from torchrun "
                             "and always checks its data)")
    world_size = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if args.print_config:
        return _print_config(args.args, world_size)
    if args.dry_run:
        from elas_megatron.cli.dryrun import dry_run

        return dry_run(args.args, world_size=world_size, vocab_size=args.vocab_size,
                       check_files=not args.no_data_check, quiet=int(os.environ.get("RANK", "0")) != 0)
    configs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    from elas_megatron.utils.interrupts import Interrupted, StartupSignals, exit_code
    from elas_megatron.utils.lifetime import forked_children_die_with_this_process

    forked_children_die_with_this_process()  # checkpoint writers, DataLoader workers: none outlives a killed rank
    # SIGTERM/SIGUSR1 from here on: one line and exit code 128 + N (utils/interrupts.py), never a traceback
    startup = StartupSignals().__enter__()
    try:
        return _train(args, configs, overrides, callbacks, startup)
    except Interrupted as exc:  # before the trainer existed (config, logging set-up, imports)
        sys.stderr.write(f"elas-train: stopped by {exc.signal_name} during start-up (reading the config); nothing "
                         "was written: rerun the same command to continue\n")
        return exit_code(exc.signal_name)
    finally:
        startup.__exit__(None, None, None)


def _train(args, configs: list[str], overrides: list[str], callbacks, startup) -> int:
    """The training part of :func:`main` (``startup``: the active :class:`StartupSignals`)."""
    from elas_megatron.config import ConfigError, load_config
    from elas_megatron.utils.interrupts import Interrupted, exit_code
    from elas_megatron.utils.logging import init_logging, log_to_file_only

    rank = int(os.environ.get("RANK", 0))
    init_logging(rank=rank)
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(configs, overrides, world_size=world)
    except ConfigError as exc:
        print(f"elas-train: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # every rank: RUN_DIR/logs/rank{R}.log (rank 0 also on the console, other ranks' warnings too)
    init_logging(cfg.log.level, rank=rank, log_dir=os.path.join(cfg.train.run_dir, "logs"))

    def fail(line: str, code: int) -> int:
        sys.stderr.write(line + "\n")  # one write: the lines of several ranks on one stream stay whole
        sys.stderr.flush()
        log_to_file_only(line)
        destroy_parallel()
        return code

    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.checkpoint import CheckpointError
    from elas_megatron.training.numerics import NumericalError
    from elas_megatron.training.trainer import Trainer

    try:  # SIGTERM/SIGUSR1 raise Interrupted until the training loop's own handler (StopSignal) takes over
        trainer = Trainer(cfg, resume=args.resume, callbacks=(_RankLogFile(), *callbacks))
        val_loss = trainer.train()
    except Interrupted as exc:
        return fail(f"elas-train: stopped by {exc.signal_name} during start-up ({exc.where or 'before training'}); "
                    "nothing was written that a rerun would not redo: rerun the same command (with --resume) to "
                    "continue", exit_code(exc.signal_name))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(f"elas-train: error: {exc}", EXIT_CONFIG)
    except NumericalError as exc:
        return fail(f"elas-train: numerical error: {exc}", EXIT_NUMERICAL)
    except BaseException:  # the traceback of anything else goes to the rank's log file too
        import traceback

        log_to_file_only(traceback.format_exc().rstrip())
        raise
    startup.__exit__(None, None, None)  # trained: the signals' previous handlers again
    if trainer.info.is_logging_rank:
        import math

        if trainer.stopped_by:
            print(f"stopped by {trainer.stopped_by} after step {trainer.step}: checkpoint saved; "
                  "rerun with --resume to continue", flush=True)
        else:
            print(f"final step {trainer.step}: validation loss {val_loss:.4f}, "
                  f"validation perplexity {math.exp(min(val_loss, 50.0)):.2f}", flush=True)
    destroy_parallel()
    return 0


def _print_config(args: list[str], world_size: int) -> int:
    """``--print-config``: the resolved config as YAML on stdout; exit 0, or 2 on a config error."""
    import yaml

    from elas_megatron.cli.dryrun import load_config_or_report
    from elas_megatron.config.loader import config_to_dict

    cfg = load_config_or_report(args, world_size=world_size, prog="elas-train")
    if cfg is None:
        return EXIT_CONFIG
    print(f"# elas-train --print-config {' '.join(args)} (world size {world_size})")
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    sys.exit(main())
