"""Every parallel layout and optimizer backend trains like the single-process run (the proof, on CPU/gloo).

Three launches (``run_cases.py``): two torchrun jobs of 2 and 4 processes that train ~50 tiny layouts between
them, and one single process that produces the reference losses and resumes the TP=2 / PP=2 checkpoints in the
TP=1 / PP=1 layout. Each layout trains ``STEPS`` optimizer steps on the same global batches (the data of a step
does not depend on the layout) from the same weights (layout-invariant init), in fp32.

Tolerance: ``LOSS_ATOL = 1e-5`` on per-step losses of about 4.8, i.e. ~20 fp32 ulps. A parallel layout computes
the same sums in another order -- TP all-reduces partial matmul sums, DP averages gradients over ranks, ZeRO and
the distributed optimizer reduce-scatter in buckets, grad norms add per-rank squares -- so results differ at the
rounding level (observed: at most 2.4e-7, one ulp, after 5 Adam steps). Anything real (a missing gradient
reduction, a wrong micro-batch weighting, swapped pipeline messages, a lost optimizer state) moves the loss by
1e-3 or more already at step 2, well above the tolerance.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import subprocs

HERE = Path(__file__).parent
SCRIPT = HERE / "run_cases.py"
sys.path.insert(0, str(HERE))
import run_cases  # noqa: E402

LOSS_ATOL = 1e-5
VARIANTS = run_cases.VARIANTS
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None  # the suites mix both backends

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int | None, timeout_s: int, **env: str) -> None:
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port())]
    cmd += [str(SCRIPT)] + args
    proc = subprocs.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not installed (see docs/parallelism.md for the CPU install line)")
    out = tmp_path_factory.mktemp("parallel_equivalence")
    ckpt = out / "checkpoints"
    ckpt.mkdir()
    _run(["world2", str(out / "world2.json"), "--checkpoints", str(ckpt)], nproc=2, timeout_s=900,
         TRITON_INTERPRET="1")  # for the model.rope_backend=triton cases
    _run(["world4", str(out / "world4.json")], nproc=4, timeout_s=900)
    _run(["reference", str(out / "reference.json"), "--checkpoints", str(ckpt)], nproc=None, timeout_s=600)
    merged: dict = {}
    for name in ("world2", "world4", "reference"):
        merged.update(json.loads((out / f"{name}.json").read_text()))
    return merged


def _assert_same_losses(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), (what, got, want)
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= LOSS_ATOL, f"{what}: per-step losses {got} differ from {want} by {worst:.3g} > {LOSS_ATOL}"


def _layout_cases() -> list[str]:
    return list(run_cases._cases_world2()) + list(run_cases._cases_world4())


@pytest.mark.parametrize("case", _layout_cases())
def test_layout_matches_single_process(results, case):
    variant = case.split("/")[0]
    reference = results[f"{variant}/reference"]["losses"]
    assert len(reference) == run_cases.STEPS
    assert reference[0] != reference[-1], "the reference loss does not move: the comparison would be vacuous"
    _assert_same_losses(results[case]["losses"], reference[:run_cases.SHORT.get(case, run_cases.STEPS)], case)


@pytest.mark.parametrize("case", sorted(run_cases.RESUME_SAME_LAYOUT.values()))
def test_resume_in_the_same_layout_continues_exactly(results, case):
    """Save after SAVE_STEP steps; a new trainer resumes (model + optimizer + scheduler) and finishes."""
    like = results[case]["like"]
    _assert_same_losses(results[case]["losses"], results[f"{like.split('/')[0]}/reference"]["losses"], case)


@pytest.mark.parametrize("source,case", sorted(run_cases.RESHARD.items()))
def test_checkpoint_reshards_to_the_single_process_layout(results, source, case):
    """A TP=2 / PP=2 (/ interleaved) checkpoint loads into TP=PP=1 and continues with the same losses."""
    variant = source.split("/")[0]
    tail = results[f"{variant}/reference"]["losses"][run_cases.SAVE_STEP:]
    _assert_same_losses(results[case]["losses"], tail, case)
