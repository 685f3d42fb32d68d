"""Every shell command in README.md and docs/*.md runs on a CPU machine, or its document says why it does not.

Collected: every command of every fenced ``bash`` / ``sh`` / ``shell`` block (continuation lines joined, comments
dropped, ``a && b`` as two commands). Every fenced block names its language (``text`` for diagrams, formulas and
sample output), so that no command hides in a block this test does not read.

**The marker.** A comment line ``# not run by the docs test: REASON`` inside a block marks the commands after it, up
to the next blank line or the end of the block: they are not run, and ``test_documented_command_runs`` reports each
as skipped with its reason (``pytest -rs`` lists them; ``test_commands_not_run_are_listed_with_a_reason`` prints the
whole list). Mark what cannot run here: a GPU, the network, a cluster, a checkpoint or data of a real run, a
placeholder (``...``, ``$RES``, ``CHECKPOINT``), training or benchmarking for minutes, or a part of this suite.
A command that is neither marked nor runnable here fails.

**How a command runs.** From a scratch view of the checkout (a temporary directory holding a link to every top-level
entry of the repository except ``data/``, and a ``data/`` with links to the shipped corpora plus a tiny C4 stand-in:
``data/c4/raw/en/c4-{train,validation}.*.json.gz``, slices of the shipped demo corpus, and
``data/c4/t5-spiece.model``, a copy of the demo tokenizer), so that nothing is written into the checkout. The
transformations, each the least that makes the command run here:

* ``elas-X`` runs as ``python -m elas_megatron.cli.X`` (the console script's entry point), ``python``/``python3``
  as this interpreter, so the checkout's code runs whether or not the package is installed;
* cluster launches (``launch/torchrun.sh`` / ``launch/submit.sh`` without ``--dry-run`` or ``--help``) get
  ``--dry-run``, which validates the config and the layout for the world size they name and starts nothing;
* a command using ``configs/c4.yaml`` gets ``--no-data-check`` when ``data/c4/tokens/c4-train`` is not there;
* an argument under ``/tmp/`` is moved under the test's temporary directory (a shared machine);
* ``elas-prep merge`` finds the per-shard datasets of the ``elas-prep tokenize`` commands in
  ``data/c4/tokens/shards/`` (made once per module), so that each command runs on its own.

A command that runs must exit 0 and print no warning (it runs with ``PYTHONWARNINGS=always``: upstream warnings
are dropped where they are raised, see :mod:`elas_megatron.compat.upstream_warnings`). A marked ``elas-train``
command (one that trains) still has its config checked: it runs with ``--dry-run``.
"""
from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCK = ("bash", "sh", "shell")
MARKER = "# not run by the docs test:"
# a command holding one of these is a template, not something to run
PLACEHOLDER = re.compile(r"^\.\.\.$|\$[A-Z_]+|^[A-Z]{3,}$")


@dataclass(frozen=True)
class Command:
    doc: str
    line: int          # where the command starts in the document
    argv: tuple[str, ...]
    not_run: str | None  # the marker's reason

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def fenced_blocks(text: str):
    """(first line number of the body, info string, body) of every fenced block."""
    for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, re.M | re.S):
        yield text.count("\n", 0, m.start()) + 2, m.group(1).strip(), m.group(2)


def documented_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands_in(doc.relative_to(REPO).as_posix(), doc.read_text())]


def commands_in(name: str, text: str) -> list[Command]:
    """The commands of the shell blocks of one document, each with its marker's reason (or None)."""
    found = []
    for first, info, body in fenced_blocks(text):
        if info.split(" ")[0] not in SHELL_BLOCK:
            continue
        reason = None
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            stripped = line.strip()
            if not stripped:
                reason = None
            elif stripped.startswith(MARKER):
                reason = stripped[len(MARKER):].strip()
                assert reason, f"{name}:{first + start}: the marker gives no reason"
            elif not stripped.startswith("#"):
                argv = shlex.split(line, comments=True)
                while argv:
                    part, argv = (argv[:argv.index("&&")], argv[argv.index("&&") + 1:]) if "&&" in argv \
                        else (argv, [])
                    found.append(Command(name, first + start, tuple(part), reason))
    return found


COMMANDS = documented_commands()


def test_the_marker_covers_the_commands_up_to_the_next_blank_line():
    doc = "\n".join([
        "```bash", "a --x \\", "    --y   # a comment", f"{MARKER} needs a GPU", "# what b does", "b && c 'q *'",
        "", "d", f"{MARKER} the network", "e", "```", "```python", "f()", "```", "```sh", "g", "```", ""])
    got = [(c.line, c.text, c.not_run) for c in commands_in("x.md", doc)]
    assert got == [(2, "a --x --y", None), (6, "b", "needs a GPU"), (6, "c 'q *'", "needs a GPU"), (8, "d", None),
                   (10, "e", "the network"), (16, "g", None)]


def test_every_fenced_block_names_its_language():
    bare = [f"{doc.relative_to(REPO)}:{first - 1}" for doc in DOCS for first, info, _ in fenced_blocks(doc.read_text())
            if not info]
    assert not bare, f"fenced blocks without a language (bash for commands, text otherwise): {bare}"


def test_commands_not_run_are_listed_with_a_reason():
    assert len(COMMANDS) >= 40, "the extraction found too few commands"
    marked = [c for c in COMMANDS if c.not_run]
    print(f"\n{len(COMMANDS) - len(marked)} documented commands run, {len(marked)} not run:")
    for c in marked:
        print(f"  {c.doc}:{c.line}: {c.text[:100]}\n      -> {c.not_run}")
    vague = [c.text for c in marked if len(c.not_run.split()) < 2]
    assert not vague, f"a marker's reason must say why (a GPU, the network, ...): {vague}"


# ---- the scratch checkout -------------------------------------------------------------------------------------

def _write_slice(src: Path, dst: Path, lines: slice) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt", encoding="utf-8") as f:
        docs = f.read().splitlines(keepends=True)[lines]
    with gzip.open(dst, "wt", encoding="utf-8") as f:
        f.writelines(docs)


@pytest.fixture(scope="module")
def checkout_template(tmp_path_factory) -> tuple[Path, Path]:
    """(a checkout view with the C4 stand-in, per-shard datasets of that stand-in for the merge commands)."""
    root = tmp_path_factory.mktemp("checkout")
    for entry in REPO.iterdir():
        if entry.name not in ("data", "runs", ".git") and not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    (root / "data").mkdir()
    for entry in (REPO / "data").iterdir():
        if entry.name != "c4":  # a real C4 download stays out of reach: the stand-in below is written here
            (root / "data" / entry.name).symlink_to(entry)
    corpus, raw = REPO / "data/demo/demo.json.gz", root / "data/c4/raw/en"
    _write_slice(corpus, raw / "c4-train.00000-of-01024.json.gz", slice(0, 30))
    _write_slice(corpus, raw / "c4-train.00001-of-01024.json.gz", slice(30, 60))
    _write_slice(corpus, raw / "c4-validation.00000-of-00008.json.gz", slice(60, 80))
    shutil.copy(REPO / "data/demo/tokenizer.model", root / "data/c4/t5-spiece.model")

    from elas_megatron.data.tokenizer import load_tokenizer
    from elas_megatron.prep.pipeline import TokenizeOptions, tokenize_corpus
    from elas_megatron.prep.sources import expand_inputs

    shards = tmp_path_factory.mktemp("c4shards")
    tokenize_corpus(expand_inputs([str(raw)]), f"{shards}/", load_tokenizer(root / "data/c4/t5-spiece.model"),
                    TokenizeOptions(workers=1, progress=False))
    return root, shards


@pytest.fixture
def checkout(checkout_template, tmp_path) -> Path:
    root, _ = checkout_template
    return Path(shutil.copytree(root, tmp_path / "checkout", symlinks=True))


def as_run_here(argv: list[str], cwd: Path, tmp: Path) -> list[str]:
    prog = argv[0]
    if prog.startswith("elas-"):
        argv = [sys.executable, "-m", f"elas_megatron.cli.{prog[len('elas-'):]}", *argv[1:]]
    elif prog in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    elif prog not in ("launch/torchrun.sh", "launch/submit.sh", "bash"):
        pytest.fail(f"`{prog}` is neither run by this test nor marked `{MARKER} REASON` in its document")
    argv = [str(tmp / a[len("/tmp/"):]) if a.startswith("/tmp/") else a for a in argv]
    if prog.startswith("launch/") and "--help" not in argv and "--dry-run" not in argv:
        argv.append("--dry-run")  # a cluster launch: validate it, start nothing
    if "configs/c4.yaml" in argv and not (cwd / "data/c4/tokens/c4-train.bin").is_file():
        argv.append("--no-data-check")
    return argv


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "NNODES",
                                                                        "NODE_RANK", "NPROC_PER_NODE"))}
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               PYTHONWARNINGS="always")  # every warning shows, DeprecationWarnings included
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.doc}:{c.line}: {c.text[:80]}" for c in COMMANDS])
def test_documented_command_runs(cmd, checkout, checkout_template, tmp_path):
    argv = list(cmd.argv)
    if cmd.not_run:
        if argv[0] == "elas-train":  # it trains: its config and overrides still have to plan
            out = run([sys.executable, "-m", "elas_megatron.cli.train", *argv[1:], "--dry-run"], checkout)
            assert out.returncode == 0, f"{cmd.doc}:{cmd.line}: {cmd.text} --dry-run\n{out.stdout[-2000:]}\n" \
                                        f"{out.stderr[-2000:]}"
        pytest.skip(f"not run: {cmd.not_run}")
    bad = [a for a in argv if PLACEHOLDER.search(a)]
    assert not bad, f"{cmd.doc}:{cmd.line}: {cmd.text} holds placeholders {bad}: mark it `{MARKER} REASON`"
    if argv[:2] == ["elas-prep", "merge"]:
        shutil.copytree(checkout_template[1], checkout / "data/c4/tokens/shards")
    argv = as_run_here(argv, checkout, tmp_path)
    out = run(argv, checkout)
    assert out.returncode == 0, f"{cmd.doc}:{cmd.line}: {shlex.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    warned = [line for line in out.stderr.splitlines() if re.search(r"\w+Warning: ", line)]
    assert not warned, f"{cmd.doc}:{cmd.line}: {cmd.text} warns:\n" + "\n".join(warned[:10])
    if "--help" in argv:
        assert Path(cmd.argv[0]).name in out.stdout and out.stderr == ""
    elif "--print-config" in argv:
        assert "train:" in out.stdout and "parallel:" in out.stdout
    elif "--dry-run" in argv:
        assert "OK" in out.stdout and "memory/" in out.stdout
    if "--output-prefix" in argv:
        prefix = argv[argv.index("--output-prefix") + 1]
        written = list((checkout / prefix).glob("*.bin")) if prefix.endswith("/") else [checkout / f"{prefix}.bin"]
        assert written and all(p.is_file() for p in written), f"{cmd.text} wrote no dataset at {prefix}"
