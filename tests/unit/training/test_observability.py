"""What a run leaves to watch it by: TensorBoard scalars equal to metrics.jsonl (also across a resume), profiler
traces, the console line's interval averages and ETA, and the one-line error of a sink whose package is missing."""
from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch

import tiny_trainer

from elas_megatron.training.metrics import MetricsLogger, read_metrics
from elas_megatron.training.sinks import MetricSink, sink_scalars
from elas_megatron.utils.errors import ConfigError

SMALL = tiny_trainer.SMALL


@pytest.fixture
def build(tmp_path):
    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    def make(*overrides, resume=False):
        cfg = load_config(None, SMALL + [f"train.run_dir={tmp_path / 'run'}", *overrides], world_size=1)
        return Trainer(cfg, resume=resume, datasets=(tiny_trainer.tokens(), tiny_trainer.tokens()))

    yield make
    destroy_parallel()


class ListSink(MetricSink):
    def __init__(self):
        self.writes, self.resumes, self.closed = [], [], False

    def write(self, step, scalars):
        self.writes.append((step, scalars))

    def resume(self, step):
        self.resumes.append(step)

    def close(self):
        self.closed = True


def _metrics(loss, seconds, tokens=1000):
    return {"loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_step": tokens, "step_time_s": seconds,
            "tokens": 0, "extra": {"sparsity/act_density": 0.5, "sparse24": True}}


def test_console_averages_the_interval_and_sinks_get_the_jsonl_record(tmp_path, caplog):
    sink = ListSink()
    log = MetricsLogger(tmp_path, enabled=True, flops_per_token=None, device=torch.device("cpu"), num_gpus=1,
                        every=2, last_step=10, sinks=[sink])
    caplog.set_level(logging.INFO, logger="elas_megatron.training.metrics")
    for step, (loss, secs) in enumerate([(4.0, 1.0), (2.0, 3.0)], start=1):
        log.on_step_begin(None, step)
        log.on_step_end(None, step, _metrics(loss, secs))
    line = caplog.messages[-1]
    # the mean of the two steps' losses and their tokens over their time, not step 2's 2.0 and 333 tok/s
    assert line.startswith("step 2/10 | loss 3.0000 | 500 tok/s | ") and "elapsed 0:00:" in line
    assert line.endswith("ETA 0:00:16 | sparsity/act_density 0.5 | sparse24 True")  # 8 steps x 2 s
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] == 2.0 and record["tokens_per_s"] == pytest.approx(1000 / 3)  # the file: the step's own
    assert sink.writes == [(2, {"loss/train": 2.0, "optim/lr": 1e-3, "optim/grad_norm": 0.5,
                                "perf/tokens_per_s": pytest.approx(1000 / 3), "perf/step_time_s": 3.0,
                                "progress/tokens": 0.0, "sparsity/act_density": 0.5})]
    log.on_evaluate(None, 2, 1.5)
    assert sink.writes[-1] == (2, {"loss/val": 1.5, "loss/val_ppl": pytest.approx(math.exp(1.5))})
    log.log_resume(step=2, checkpoint="step_00000002")
    assert sink.resumes == [2] and len(sink.writes) == 2
    log.on_train_end(None)
    assert sink.closed


def test_console_mfu_and_memory_cover_the_interval_and_the_file_keeps_each_step(tmp_path, caplog, monkeypatch):
    log = MetricsLogger(tmp_path, enabled=True, flops_per_token=1e9, device=torch.device("cpu"), num_gpus=1,
                        every=2, last_step=4)
    log.peak_total = 1e12  # as on a GPU of 1 TFLOP/s
    peak = {1: 7.0, 2: 3.0}  # each step's own memory peak (GiB)
    caplog.set_level(logging.INFO, logger="elas_megatron.training.metrics")
    for step, secs in enumerate([1.0, 3.0], start=1):
        monkeypatch.setattr(log, "_memory_peak_gib", lambda step=step: peak[step])
        log.on_step_begin(None, step)
        log.on_step_end(None, step, _metrics(2.0, secs))
    line = caplog.messages[-1]
    # 2000 tokens in 4 s = 500 tok/s -> 500 * 1e9 / 1e12 = 50 %; the interval's peak is step 1's 7 GiB
    assert "| 500 tok/s |" in line and "| mfu 50.0% | mem 7.0 GiB |" in line
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["mfu"] == pytest.approx(1000 / 3 * 1e9 / 1e12) and record["mem_peak_gib"] == 3.0  # step 2's own


def test_sink_names_are_slash_namespaced():
    scalars = sink_scalars({"step": 3, "loss": 2.5, "mfu": 0.4, "mem_peak_gib": 12.0, "grad_norm": "inf",
                            "sparse24": True, "sparsity/act_density": 0.49, "skipped_steps": 1})
    assert scalars == {"loss/train": 2.5, "perf/mfu": 0.4, "memory/peak_gib": 12.0, "sparsity/act_density": 0.49,
                       "optim/skipped_steps": 1.0}


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_jsonl_values_and_a_resume_replaces_steps(build):
    pytest.importorskip("tensorboard")
    # an interrupted run: checkpoint at step 2, trained on to 4, no final save; then --resume from 2 to 4
    build("log.tensorboard=true", "log.every=1", "checkpoint.save_final=false").train()
    trainer = build("log.tensorboard=true", "log.every=1", "checkpoint.save_final=false", resume=True)
    trainer.train()
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    tb = _tensorboard_scalars(trainer.run_dir / "tensorboard")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for tag, key in [("loss/train", "loss"), ("optim/lr", "lr"), ("optim/grad_norm", "grad_norm"),
                     ("perf/tokens_per_s", "tokens_per_s"), ("perf/step_time_s", "step_time_s")]:
        assert [s for s, _ in tb[tag]] == [1, 2, 3, 4], tag  # one value per step: the resumed run's 3 and 4
        assert [v for _, v in tb[tag]] == pytest.approx([r[key] for r in steps], rel=1e-6), tag
    evals = [r for r in records if "val_loss" in r]
    assert [s for s, _ in tb["loss/val"]] == [r["step"] for r in evals] == [2, 4]
    assert [v for _, v in tb["loss/val"]] == pytest.approx([r["val_loss"] for r in evals], rel=1e-6)


def test_a_requested_sink_without_its_package_stops_with_one_line(build, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError) as err:
        build("log.tensorboard=true")
    message = str(err.value)
    assert "\n" not in message and "pip install 'elas-megatron[tensorboard]'" in message
    assert message.startswith("log.tensorboard needs the 'tensorboard' package")


def test_profiler_writes_a_loadable_chrome_trace_and_skips_the_snapshot_on_cpu(build, caplog):
    caplog.set_level(logging.INFO, logger="elas_megatron.training.profiling")
    trainer = build("train.steps=3", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
                    "log.profile_steps=[2,3]", "log.memory_snapshot_step=2")
    trainer.train()
    files = sorted(p.name for p in (trainer.run_dir / "profile").iterdir())
    assert files == ["trace_rank0_steps2-3.json"]
    trace = json.loads((trainer.run_dir / "profile" / files[0]).read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert len(trace["traceEvents"]) > 100 and any(n.startswith("aten::") for n in names)
    assert any("memory_snapshot_step=2 skipped" in m for m in caplog.messages)
