"""Checkpoints cannot run code and load only as written: a hostile pickle in every place a checkpoint is read (with
its manifest rewritten to match, so the unpickling itself is what refuses) runs nothing and is refused in one line
naming the file; flipped bytes are refused by the manifest; ``latest`` is never followed out of the directory; bad
JSON names its file; ``elas-eval`` / ``elas-export`` print one line."""
from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from elas_megatron.training.checkpoint import CheckpointError
from elas_megatron.training.checkpoint_trust import write_manifest


class Evil:
    """Unpickling it creates ``marker``: proof that code ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def saved(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.train_step()
    return trainer.save(), tmp_path / "code_ran"


def _refused(make_trainer, marker, file, *, resume=True):
    with pytest.raises(CheckpointError) as info:
        make_trainer(resume=True)
    message = str(info.value)
    assert "\n" not in message and str(file) in message and "refusing to load it" in message, message
    assert not marker.exists(), "unpickling the checkpoint ran code"
    return message


def test_a_hostile_metadata_file_runs_nothing(saved, make_trainer, tmp_path):
    path, marker = saved
    (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    write_manifest(path)  # an attacker can rewrite the manifest too
    assert "it references posix.system" in _refused(make_trainer, marker, path / ".metadata")

    from elas_megatron.cli.eval import main as eval_main
    from elas_megatron.cli.export import main as export_main

    assert eval_main([str(path)]) == 2
    assert export_main([str(path), str(tmp_path / "out")]) == 2
    assert not marker.exists()


def test_a_hostile_object_entry_runs_nothing(saved, make_trainer):
    """The RNG states (a megatron ShardedObject) are torch.save'd bytes inside a .distcp file that torch's planner
    loads with weights_only=False: point their entry at a hostile pickle."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path, marker = saved
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    buf = io.BytesIO()
    torch.save({"random": Evil(marker)}, buf)
    (path / "__9_9.distcp").write_bytes(buf.getvalue())
    entries = [i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
               and i.fqn.startswith("rng_state")]
    assert entries
    info = metadata.storage_data[entries[0]]
    metadata.storage_data[entries[0]] = type(info)(relative_path="__9_9.distcp", offset=0, length=len(buf.getvalue()))
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    write_manifest(path)
    assert "weights_only" in _refused(make_trainer, marker, path / "__9_9.distcp")


def test_a_hostile_common_file_runs_nothing(saved, make_trainer):
    path, marker = saved
    torch.save({"step": Evil(marker)}, path / "common.pt")
    write_manifest(path)
    _refused(make_trainer, marker, path / "common.pt")


def test_a_hostile_zero_state_file_runs_nothing(make_trainer, tmp_path):
    ds = ["parallel.optimizer=deepspeed", "parallel.zero_stage=1"]
    trainer = make_trainer(*ds)
    trainer.train_step()
    path = trainer.save()
    marker = tmp_path / "code_ran"
    zero = next((path / "zero").glob("*.pt"))
    torch.save({"zero_stage": 1, "optimizer": Evil(marker)}, zero)
    write_manifest(path)
    with pytest.raises(CheckpointError) as info:
        make_trainer(*ds, resume=True)
    assert "\n" not in str(info.value) and str(zero) in str(info.value), info.value
    assert not marker.exists()
    assert make_trainer(*ds) is not None


def test_flipped_bytes_are_refused_naming_the_file_and_an_old_checkpoint_loads_unverified(saved, make_trainer,
                                                                                         caplog):
    path, _ = saved
    shard = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    for at in (1000, 2000, 3000):
        data[at] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size
    with pytest.raises(CheckpointError, match=rf"{shard} does not match the sha256 in manifest.json; .*latest"):
        make_trainer(resume=True)
    data = bytearray(shard.read_bytes())
    for at in (1000, 2000, 3000):
        data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    (path / "manifest.json").unlink()  # as written before manifests existed
    assert make_trainer(resume=True).step == 1
    assert "its files are NOT verified" in caplog.text


@pytest.mark.parametrize("pointer", ["/etc", "../elsewhere/step_00000001", "step_00000001/..", "step_1/x", "other"])
def test_latest_never_leaves_the_checkpoint_directory(saved, make_trainer, pointer):
    from elas_megatron.export.checkpoint import resolve_checkpoint

    path, _ = saved
    (path.parent / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match=r"latest names .*not a step_\* directory .*refusing to follow it"):
        make_trainer(resume=True)
    with pytest.raises(CheckpointError, match="refusing to follow it"):
        resolve_checkpoint(path.parent)


@pytest.mark.parametrize("name,text", [("elas_meta.json", "{'step': 1"), ("metadata.json", "{}"),
                                       ("manifest.json", "[1, 2")])
def test_bad_json_names_the_file(saved, make_trainer, name, text):
    path, _ = saved
    (path / name).write_text(text)
    if name != "manifest.json":
        write_manifest(path)
    with pytest.raises(CheckpointError, match=rf"{path / name}: "):
        make_trainer(resume=True)


def test_cli_on_a_damaged_checkpoint_prints_one_line(saved, tmp_path, capsys):
    from elas_megatron.cli.eval import main as eval_main
    from elas_megatron.cli.export import main as export_main

    path, _ = saved
    shard = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(b"\0" * shard.stat().st_size)
    capsys.readouterr()
    assert eval_main([str(path)]) == 2
    assert export_main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 2 and all("failed verification" in line for line in errors), err
    assert not any("Traceback" in line for line in err)


def test_elas_ckpt_verify_reports_each_checkpoint(saved, tmp_path, capsys):
    """elas-ckpt verify: OK for an intact checkpoint (named as latest), FAILED naming the file for flipped bytes or a
    hostile .metadata, UNVERIFIED without a manifest; nothing runs; exit codes 0 / 1 / 2."""
    from elas_megatron.cli.ckpt import main as ckpt_main

    path, marker = saved
    run_dir = path.parent.parent
    assert ckpt_main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK          {path.name}  (") and "files match the manifest" in out and "; latest)" in out
    import shutil

    old = path.parent / "step_00000000"  # a checkpoint of a version that wrote no manifest
    shutil.copytree(path, old)
    (old / "manifest.json").unlink()
    assert ckpt_main(["verify", str(run_dir)]) == 0
    assert f"UNVERIFIED  {old.name}  (no manifest" in capsys.readouterr().out
    shutil.rmtree(old)

    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt_main(["verify", str(path.parent)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAILED      {path.name}  ") and str(shard) in out and "sha256" in out

    (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    write_manifest(path)
    assert ckpt_main(["verify", str(path)]) == 1
    assert "it references posix.system" in capsys.readouterr().out and not marker.exists()

    (path / "manifest.json").unlink()
    assert ckpt_main(["verify", str(path)]) == 1  # still hostile: no manifest does not mean no check

    assert ckpt_main(["verify", str(tmp_path / "nothing_here")]) == 2
    (tmp_path / "empty").mkdir()
    assert ckpt_main(["verify", str(tmp_path / "empty")]) == 2
