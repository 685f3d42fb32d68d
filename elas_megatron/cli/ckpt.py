# SPDX-License-Identifier: Apache-2.0
"""``elas-ckpt verify PATH...``: check checkpoints without loading them (nothing in them runs).

PATH is a run directory (its ``checkpoints/``), a checkpoint directory (every ``step_*`` in it) or one ``step_*``
directory. Each checkpoint's files are compared with its manifest (size and sha256) and its pickled parts are read
the way a load reads them, allow-listed (:mod:`elas_megatron.training.checkpoint_trust`). One line per checkpoint:

    OK          step_00000300  (12 files match the manifest; latest)
    UNVERIFIED  step_00000100  (no manifest: written by an older version; plain data only)
    FAILED      step_00000200  <why, naming the file>

Exit codes: 0 every checkpoint OK (or UNVERIFIED), 1 one FAILED, 2 no checkpoint found / bad arguments. Why a
command of its own: a copy to another cluster, or a checkpoint kept for months, can be checked before a job is
queued on it, and without a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elas_megatron.training.checkpoint_trust import (MANIFEST, STEP_NAME, read_json, resolve_latest,
                                                      verify_manifest, vet_checkpoint)
from elas_megatron.utils.errors import CheckpointError

__all__ = ["main", "step_dirs"]


def step_dirs(path: Path) -> tuple[list[Path], Path | None]:
    """The checkpoints ``path`` holds (a run, checkpoint or step directory) and the one ``latest`` names."""
    if STEP_NAME.fullmatch(path.name) and path.is_dir():
        return [path], None
    if (path / "checkpoints").is_dir() and not any(path.glob("step_*")):
        path = path / "checkpoints"
    steps = sorted(p for p in path.glob("step_*") if p.is_dir() and STEP_NAME.fullmatch(p.name))
    try:
        latest = resolve_latest(path)
    except CheckpointError:
        latest = None  # reported by verify(): a bad pointer is itself a finding
    return steps, latest


def verify(step_dir: Path) -> tuple[str, str]:
    """``(status, detail)`` of one checkpoint: OK, UNVERIFIED (no manifest) or FAILED."""
    try:
        verified = verify_manifest(step_dir)
        vet_checkpoint(step_dir)
    except CheckpointError as exc:
        return "FAILED", str(exc)
    if not verified:
        return "UNVERIFIED", "no manifest: written by an older version; plain data only"
    files = len(read_json(step_dir / MANIFEST).get("files", {}))
    return "OK", f"{files} files match the manifest; plain data only"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elas-ckpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="compare checkpoints with their manifests; read nothing that could run")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="a run directory, a checkpoint directory or a step_* directory")
    args = parser.parse_args(argv)
    failed = found = 0
    for path in args.paths:
        if not path.is_dir():
            print(f"elas-ckpt: error: {path} is not a directory", file=sys.stderr)
            return 2
        steps, latest = step_dirs(path)
        try:
            resolve_latest(steps[0].parent if steps else path)
        except CheckpointError as exc:
            print(f"FAILED      latest  {exc}")
            failed += 1
        for step in steps:
            found += 1
            status, detail = verify(step)
            failed += status == "FAILED"
            mark = "; latest" if latest is not None and step.resolve() == latest.resolve() else ""
            print(f"{status:<11} {step.name}  ({detail}{mark})" if status != "FAILED"
                  else f"{status:<11} {step.name}  {detail}")
    if not found:
        print(f"elas-ckpt: error: no step_* checkpoint under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
