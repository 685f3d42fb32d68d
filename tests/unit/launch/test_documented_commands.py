"""Every launcher command in README.md and docs/*.md (fenced bash blocks) runs as written, on a CPU machine.

Collected: the commands that start with ``elas-train``, ``launch/torchrun.sh`` or ``launch/submit.sh``. Each one runs
from the repository root and must exit 0, except those in ``SKIPPED`` (each with its reason):

* planning commands (``--dry-run``, ``--help``, ``--print-config``) run as written;
* cluster launches (``launch/torchrun.sh`` / ``launch/submit.sh`` without ``--dry-run``) run with ``--dry-run`` added,
  which validates the config and the layout for the world size they name and starts nothing;
* where a command uses ``configs/c4.yaml`` and the C4 tokenizer is not on disk, ``--no-data-check`` is added (the
  vocabulary then comes from ``model.vocab_size``, which ``configs/c4.yaml`` sets).

``elas-train`` runs as ``python -m elas_megatron.cli.train`` (the console script's entry point) so the checkout's
code runs whether or not the package is installed. Other tools (``elas-prep``, ``elas-bench``, ``elas-eval``,
``elas-export``, install and download commands) are not collected: their own tests cover them.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LAUNCHERS = ("elas-train", "launch/torchrun.sh", "launch/submit.sh")
PLANNING = ("--dry-run", "--help", "--print-config")

# Documented launcher commands that cannot run here, and why. Keys are the commands as extracted (continuation
# lines joined, comments dropped, single spaces); an entry no document holds any more fails the test.
SKIPPED = {
    "elas-train configs/demo.yaml": "trains the demo model (minutes on CPU); tests/integration/test_train.py trains "
                                    "the same config",
    "elas-train configs/demo.yaml train.steps=50 model.variant=cola": "trains (minutes on CPU); overrides are "
                                                                      "covered by tests/unit/config",
    "elas-train configs/demo.yaml --resume": "needs a checkpoint of an earlier run; tests/integration/test_train.py "
                                             "resumes one",
    "launch/torchrun.sh --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 configs/c4.yaml ...":
        "a placeholder (`...`) for the rest of a command, run on two hosts; tests/integration/test_launch.py runs "
        "torchrun.sh --nnodes 2 on localhost",
}


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every launcher command in a fenced bash block of README.md and docs/*.md."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.finditer(r"^```(?:bash|sh|shell)\n(.*?)^```", doc.read_text(), re.M | re.S):
            for line in block.group(1).replace("\\\n", " ").splitlines():
                for part in " ".join(shlex.split(line, comments=True)).split(" && "):
                    if part.startswith(LAUNCHERS):
                        found.append((doc.relative_to(REPO).as_posix(), part))
    return found


COMMANDS = documented_commands()


def test_the_documents_hold_the_commands_this_test_knows():
    assert len(COMMANDS) >= 8
    texts = {cmd for _, cmd in COMMANDS}
    assert not set(SKIPPED) - texts, f"SKIPPED names commands no document holds: {set(SKIPPED) - texts}"


def as_run_here(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "elas-train":
        argv = [sys.executable, "-m", "elas_megatron.cli.train", *argv[1:]]
    if "--help" in argv or "--print-config" in argv:
        return argv
    if "--dry-run" not in argv:  # a cluster launch: validate it, start nothing
        argv.append("--dry-run")
    if "configs/c4.yaml" in argv and not (REPO / "data/c4/t5-spiece.model").is_file():
        argv.append("--no-data-check")
    return argv


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}: {c[:90]}" for d, c in COMMANDS])
def test_documented_command_runs(doc, command):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    argv = as_run_here(command)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "NNODES",
                                                                        "NODE_RANK", "NPROC_PER_NODE"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, f"{doc}: {' '.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    if "--help" in argv:
        assert Path(shlex.split(command)[0]).name in out.stdout and out.stderr == ""
    elif "--print-config" in argv:
        assert "train:" in out.stdout and "parallel:" in out.stdout
    else:
        assert "OK" in out.stdout and "memory/" in out.stdout
