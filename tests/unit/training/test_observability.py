"""What a run leaves to watch it by: TensorBoard scalars and W&B (offline) values equal to metrics.jsonl (also across
a resume), profiler traces, the console line's interval averages and ETA, and the one-line error of a sink whose
package is missing."""
from __future__ import annotations

import json
import logging
import math
import struct
import sys
import time

import pytest
import torch

import tiny_trainer

from elas_megatron.training.metrics import MetricsLogger, read_metrics
from elas_megatron.training.sinks import (WANDB_STATE, MetricSink, TensorBoardSink, WandbSink, resolve_wandb_mode,
                                          sink_scalars)
from elas_megatron.utils.errors import ConfigError

SMALL = tiny_trainer.SMALL


class _StalledWriter:
    """A SummaryWriter whose file is on a stalled disk: ``flush`` and ``close`` never return on their own."""

    def __init__(self, log_dir, **kwargs):
        import threading

        self.kwargs, self.scalars, self.disk = kwargs, [], threading.Event()

    def add_scalar(self, name, value, step):
        self.scalars.append((step, name, value))

    def flush(self):
        self.disk.wait()

    close = flush


def test_a_tensorboard_write_does_not_wait_for_the_file(tmp_path):
    """Values are queued; the writer's thread flushes them on its own every FLUSH_S seconds, and at close (the
    trainer's end). A write that waited for the file would stall the step while the other ranks wait."""
    import threading

    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path)
    sink._writer_class = _StalledWriter
    done = threading.Thread(target=lambda: [sink.write(step, {"loss/train": 1.0 / step}) for step in (1, 2)],
                            daemon=True)
    done.start()
    done.join(timeout=60)  # a failure bound: a write that waits for the stalled disk never returns
    assert not done.is_alive(), "TensorBoardSink.write waited for the file"
    writer = sink._writer
    assert writer.scalars == [(1, "loss/train", 1.0), (2, "loss/train", 0.5)]
    assert writer.kwargs["flush_secs"] == TensorBoardSink.FLUSH_S <= 30
    assert writer.kwargs["max_queue"] >= 10 * len(sink_scalars({"loss": 1, "lr": 1, "grad_norm": 1, "mfu": 1}))
    writer.disk.set()
    sink.close()


@pytest.fixture
def build(tmp_path):
    from elas_megatron.config.loader import load_config
    from elas_megatron.parallel.setup import destroy_parallel
    from elas_megatron.training.trainer import Trainer

    def make(*overrides, resume=False):
        cfg = load_config(None, SMALL + [f"train.run_dir={make.run_dir}", *overrides], world_size=1)
        return Trainer(cfg, resume=resume, datasets=(tiny_trainer.tokens(), tiny_trainer.tokens()))

    make.run_dir = tmp_path / "run"
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


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode with every directory it writes under tmp_path: no network, nothing in the home directory."""
    pytest.importorskip("wandb")
    for var, sub in [("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_CACHE_DIR", "wandb_cache"),
                     ("WANDB_DATA_DIR", "wandb_data")]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return ["log.wandb_project=elas-test", "log.wandb_mode=offline", "log.every=1"]


def _wandb_records(path):
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (W&B's leveldb-style log: a 7-byte file
    header, then 32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle /
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, head = path.read_bytes(), 32768, 7
    if len(data) < head:  # not written yet
        return
    assert data[:4] == b":W&B"
    pos, chunks = head, b""
    while pos + head <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + head]) if left >= head else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunks += data[pos + head:pos + head + length]
        pos += head + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_history(run_dir) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    """(run ids, name -> [(step, value)]) over every offline run directory W&B wrote in ``run_dir``, in order.
    ``run.finish()`` returns before W&B's service process has written the file's last records: each file is read
    once it ends with the run's exit record."""
    ids, history = set(), {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + 30
        while not (records := list(_wandb_records(path))) or records[-1].WhichOneof("record_type") != "exit":
            assert time.monotonic() < deadline, f"{path} has no exit record after 30 s"
            time.sleep(0.05)
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                for item in record.history.item:
                    name = item.key or "/".join(item.nested_key)  # "loss/train" is stored as nested ["loss", "train"]
                    if not name.startswith("_"):
                        history.setdefault(name, []).append((record.history.step.num, json.loads(item.value_json)))
    return ids, history


NAMES = [("loss/train", "loss"), ("optim/lr", "lr"), ("optim/grad_norm", "grad_norm"),
         ("perf/tokens_per_s", "tokens_per_s"), ("perf/step_time_s", "step_time_s"), ("progress/tokens", "tokens")]


def test_wandb_offline_holds_the_jsonl_values_and_resume_continues_the_run(build, wandb_offline):
    # steps 1-2 (final checkpoint at 2), then --resume to step 4: one W&B run, steps 1-4 once each, the JSONL's values
    build(*wandb_offline, "train.steps=2").train()
    run_id = json.loads((build.run_dir / WANDB_STATE).read_text())["id"]
    trainer = build(*wandb_offline, resume=True)
    trainer.train()
    state = json.loads((trainer.run_dir / WANDB_STATE).read_text())
    assert state == {"id": run_id, "project": "elas-test", "entity": None, "last_step": 4}
    ids, history = _wandb_history(trainer.run_dir)
    assert ids == {run_id}
    records = read_metrics(trainer.run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for name, key in NAMES:
        assert history[name] == [(r["step"], r[key]) for r in steps], name
    evals = [r for r in records if "val_loss" in r]
    assert history["loss/val"] == [(r["step"], r["val_loss"]) for r in evals] == [(2, evals[0]["val_loss"]),
                                                                                    (4, evals[1]["val_loss"])]


def test_wandb_resume_from_an_earlier_checkpoint_sends_no_step_twice(build, wandb_offline, caplog):
    # checkpoint at 2, trained on to 4 and stopped without a save; --resume trains 3 and 4 again: W&B keeps the
    # first values of 3 and 4 (it accepts a step once), metrics.jsonl's read_metrics the resumed ones
    build(*wandb_offline, "checkpoint.save_final=false").train()
    first = [json.loads(line) for line in (build.run_dir / "metrics.jsonl").read_text().splitlines()]
    caplog.set_level(logging.INFO, logger="elas_megatron.training.sinks")
    build(*wandb_offline, "checkpoint.save_final=false", resume=True).train()
    assert any("already holds steps up to 4; this run resumed at step 2" in m for m in caplog.messages)
    ids, history = _wandb_history(build.run_dir)
    assert len(ids) == 1
    first_steps = [r for r in first if "loss" in r]
    assert history["loss/train"] == [(r["step"], r["loss"]) for r in first_steps]
    assert [s for s, _ in history["loss/val"]] == [2, 4]


def test_wandb_that_cannot_start_warns_once_and_training_goes_on(wandb_offline, tmp_path, monkeypatch, caplog):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.CommError("no route to host")

    monkeypatch.setattr(wandb, "init", refuse)
    sink = WandbSink(tmp_path, project="p", mode="online")
    sink.resume(0)
    sink.write(1, {"loss/train": 1.0})
    sink.close()
    warnings = [m for m in caplog.messages if "could not start" in m]
    assert len(warnings) == 1 and "CommError: no route to host" in warnings[0] and "training continues" in warnings[0]
    assert not (tmp_path / WANDB_STATE).exists()


def test_wandb_mode_auto_is_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_wandb_mode("auto") == ("offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto")[0] == "offline"
    assert resolve_wandb_mode("online") == ("online", "log.wandb_mode=online")


@pytest.mark.parametrize("module, extra, key, override", [
    ("tensorboard", "tensorboard", "log.tensorboard", "log.tensorboard=true"),
    ("wandb", "wandb", "log.wandb_project", "log.wandb_project=p"),
])
def test_a_requested_sink_without_its_package_stops_with_one_line(build, monkeypatch, module, extra, key, override):
    monkeypatch.setitem(sys.modules, module, None)  # import <module> -> ImportError
    with pytest.raises(ConfigError) as err:
        build(override)
    message = str(err.value)
    assert "\n" not in message and f"pip install 'elas-megatron[{extra}]'" in message
    assert message.startswith(f"{key} needs the '{module}' package")


def test_profiler_writes_a_loadable_chrome_trace_and_skips_the_snapshot_on_cpu(build, caplog):
    caplog.set_level(logging.INFO, logger="elas_megatron.training.profiling")
    trainer = build("train.steps=3", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=false",
                    "log.profile_steps=[2,3]", "log.memory_snapshot_step=2")
    layers = [m for chunk in trainer.model for m in chunk.modules() if type(m).__name__ == "TransformerLayer"]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers]
    trainer.train()
    files = sorted(p.name for p in (trainer.run_dir / "profile").iterdir())
    assert files == ["trace_rank0_steps2-3.json"]
    trace = json.loads((trainer.run_dir / "profile" / files[0]).read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert len(trace["traceEvents"]) > 100 and any(n.startswith("aten::") for n in names)
    assert any("memory_snapshot_step=2 skipped" in m for m in caplog.messages)
    # each layer's forward and backward is a named range: 2 traced steps x 2 micro-batches each
    ranges = [e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("layer ")]
    assert {name: ranges.count(name) for name in set(ranges)} == {
        f"layer {n} {phase}": 4 for n in (1, 2) for phase in ("forward", "backward")}
    assert len(layers) == 2 and [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers] == hooks


def test_layer_ranges_open_and_close_an_nvtx_range_each(build, monkeypatch):
    # the GPU path's NVTX calls, recorded on CPU: every range started is ended, with the layers' names
    from elas_megatron.training.profiling import LayerRanges

    calls, ids = [], iter(range(1000))

    def start(name):
        calls.append(("start", name, handle := next(ids)))
        return handle

    monkeypatch.setattr(torch.cuda.nvtx, "range_start", start)
    monkeypatch.setattr(torch.cuda.nvtx, "range_end", lambda handle: calls.append(("end", None, handle)))
    trainer = build()
    ranges = LayerRanges(trainer.model, nvtx=True)
    trainer.train_step()  # 2 micro-batches
    ranges.remove()
    trainer.train_step()  # no ranges once removed
    started = {h: name for kind, name, h in calls if kind == "start"}
    assert sorted(h for kind, _, h in calls if kind == "end") == sorted(started)
    assert sorted(started.values()) == sorted(f"layer {n} {phase}" for n in (1, 2) for phase in ("forward", "backward")
                                              for _ in range(2))
