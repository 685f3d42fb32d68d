"""Two "nodes" on one machine: launch/torchrun.sh --nnodes 2 twice on localhost (c10d rendezvous, gloo).

The model is split over the two nodes as a 2-stage pipeline. Its losses must match a single-process run of the
same config, each rank leaves its log in RUN_DIR/logs/rank{R}.log, and its checkpoint (saved at PP=2) must load into one process: ``elas-eval`` reproduces the
validation loss the pipelined run logged, and ``elas-export`` gives the single-process run's logits.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import subprocs
import torch

from elas_megatron.cli.eval import main as eval_main
from elas_megatron.cli.export import main as export_main
from elas_megatron.cli.train import main as train_main
from elas_megatron.export.checkpoint import load_checkpoint
from elas_megatron.export.modeling_elas import ElasForCausalLM
from elas_megatron.parallel.setup import destroy_parallel

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
CONFIG = [str(REPO / "configs/demo.yaml"), "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
          "model.ffn_hidden_size=128", "model.rank=16", "model.dense_warmup_steps=1", "train.seq_len=64",
          "train.global_batch=8", "train.micro_batch=4", "train.eval_iters=2", "train.steps=3", "log.every=1",
          f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
          f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]


def records(run_dir: Path) -> tuple[list[dict], float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r][-1]["val_loss"]


def test_two_node_pipeline_matches_one_process_and_its_checkpoint_exports(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    env.pop("WORLD_SIZE", None)
    two_node = tmp_path / "two_node"
    nodes = [subprocess.Popen(
        ["launch/torchrun.sh", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", *CONFIG, "parallel.pp=2",
         f"train.run_dir={two_node}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True) for rank in range(2)]
    try:
        # bounds a hang only: beside two CPU hogs a process in its own session took minutes just to start
        outputs = [node.communicate(timeout=900)[0] for node in nodes]
    finally:
        for node in nodes:
            subprocs.kill_group(node)
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:]
    assert "world 2 = dp 1 x tp 1 x pp 2" in outputs[0] and "memory/GPU" not in outputs[1]
    # each rank's own log: rank 1 (the last stage) logged the steps the console of its node does not show
    logs = two_node / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank0.log", "rank1.log"]
    assert "saved checkpoint" in (logs / "rank0.log").read_text()
    assert "step 3/3 | loss" in (logs / "rank1.log").read_text()

    one = tmp_path / "one_process"
    assert train_main([*CONFIG, f"train.run_dir={one}"]) == 0
    steps2, val2 = records(two_node)
    steps1, val1 = records(one)
    assert [r["step"] for r in steps2] == [1, 2, 3] and [r["sparse24"] for r in steps2] == [False, True, True]
    for a, b in zip(steps2, steps1, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert val2 == pytest.approx(val1, rel=1e-5)

    # the PP=2 checkpoint in one process
    result = tmp_path / "eval.json"
    assert eval_main([str(two_node), "--json", str(result)]) == 0
    assert json.loads(result.read_text())["loss"] == pytest.approx(val2, rel=1e-6)
    assert export_main([str(two_node), str(tmp_path / "export")]) == 0
    exported = ElasForCausalLM.from_pretrained(tmp_path / "export")
    reference = load_checkpoint(one).model
    tokens = torch.randint(0, exported.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens, torch.arange(64).expand(2, 64), None)
    torch.testing.assert_close(exported(tokens), expected, rtol=1e-4, atol=1e-4)
    destroy_parallel()
