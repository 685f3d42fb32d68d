# SPDX-License-Identifier: Apache-2.0
"""What is checked before a checkpoint is loaded: nothing in it may run code, and its files must be the ones written.

Why checks before the load instead of a replacement reader: megatron's ``dist_checkpointing.load`` builds its own
torch ``FileSystemReader`` in several places (``load``, ``load_tensors_metadata``, ``load_sharded_metadata``), which
unpickles ``.metadata`` with plain ``pickle``, and torch's load planner reads every object entry (megatron
``ShardedObject`` data: this run's RNG states, layers' ``_extra_state``) with ``torch.load(weights_only=False)``.
Neither can be swapped from outside without copying megatron-private code that changes between releases. The file
formats, on the other hand, are fixed by torch's distributed checkpoint, so :func:`vet_checkpoint` reads the very
bytes the loader will read, before it does, and refuses anything that is not plain data:

* ``manifest.json`` (written last into each checkpoint before it is published, :func:`write_manifest`): the size
  and sha256 of every file is compared (:func:`verify_manifest`); a checkpoint of an older version has none and
  loads with a warning that it is unverified;
* ``.metadata``: unpickled by :class:`MetadataUnpickler`, whose allow-list (:data:`METADATA_GLOBALS`) holds only the
  classes torch's checkpoint metadata consists of (found by listing the globals of real checkpoints); any other
  global -- ``os.system``, ``builtins.eval``, ... -- is refused before it is looked up, so nothing runs;
* every object entry that ``.metadata`` lists: its bytes are read from the ``.distcp`` file and loaded with
  ``torch.load(weights_only=True)`` (plain containers, tensors, and the plain types megatron-core registers with
  ``torch.serialization.add_safe_globals``, e.g. NumPy arrays of the RNG state);
* ``common.pt`` with ``torch.load(weights_only=True)``; ``metadata.json`` and ``elas_meta.json`` as JSON objects.

The manifest is verified first, so the vetted bytes are the written ones; a file changed between the check and the
load (by someone who can write into the checkpoint while it is being loaded) is outside what this protects.
Every refusal is one :class:`CheckpointError` line naming the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path

import torch

from elas_megatron.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STEP_NAME = re.compile(r"step_\d+")

_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")]
    + [(f"{_DCP}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")]
    + [(f"{_DCP}.filesystem", "_StorageInfo"),
       ("torch", "Size"), ("torch.serialization", "_get_layout"),  # _get_layout: a lookup of torch.strided etc.
       ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")])
"""The globals a torch distributed checkpoint's ``.metadata`` may reference (plus every ``torch`` dtype): dataclasses,
enums and containers of the checkpoint's own description, none of which runs anything when built."""


def _allowed(module: str, name: str) -> bool:
    return (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype))


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`METADATA_GLOBALS` and torch dtypes; refuses any other."""

    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"it references {module}.{name}, which checkpoint metadata never holds")
        return super().find_class(module, name)


def _refuse(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; refusing to load it (the checkpoint is damaged or was not written by "
                           "elas-megatron; resume from an older step_* directory or another checkpoint)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def load_metadata(step_dir: str | Path):
    """The ``.metadata`` of a distributed checkpoint, unpickled with :class:`MetadataUnpickler`."""
    path = Path(step_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise _refuse(path, "missing") from None
    except Exception as exc:  # noqa: BLE001  UnpicklingError, EOFError, ... of a damaged or hostile file
        raise _refuse(path, f"not plain checkpoint metadata ({_first_line(exc)})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise _refuse(path, f"holds a {type(metadata).__name__}, not torch checkpoint metadata")
    return metadata


def torch_load_plain(source, path: Path):
    """``torch.load(source, weights_only=True)`` with a one-line :class:`CheckpointError` naming ``path``."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _refuse(path, "missing") from None
    except Exception as exc:  # noqa: BLE001  UnpicklingError (a disallowed global), RuntimeError (not a torch file)
        raise _refuse(path, f"not plain data ({_first_line(exc)})") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; invalid JSON or another type is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _refuse(path, f"holds a JSON {type(value).__name__}, not an object")
    return value


def _vet_objects(step_dir: Path, metadata) -> None:
    """Load every object entry (``BytesStorageMetadata``) of ``metadata`` with ``weights_only=True``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        rel = str(info.relative_path)
        file = step_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or len(Path(rel).parts) != 1:
            raise _refuse(step_dir / ".metadata", f"names a data file outside the checkpoint ({rel!r})")
        if getattr(info, "transform_descriptors", None):
            raise _refuse(file, f"entry {index.fqn} is stored with transforms {info.transform_descriptors}, which "
                                "elas-megatron never writes")
        try:
            with open(file, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as exc:
            raise _refuse(file, _first_line(exc)) from None
        torch_load_plain(io.BytesIO(data), Path(f"{file} (entry {index.fqn})"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: str | Path) -> Path:
    """Write ``manifest.json`` (size and sha256 of every other file) into ``step_dir`` and fsync it. Called by the
    publishing rank after every file is written, into the unpublished temporary directory: the rename that
    publishes the directory makes the manifest appear atomically with the files it describes (a kill before it
    leaves a ``.tmp`` directory that no load reads)."""
    step_dir = Path(step_dir)
    files = {rel: {"size": (step_dir / rel).stat().st_size, "sha256": _sha256(step_dir / rel)}
             for rel in _files(step_dir)}
    path = step_dir / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return path


def verify_manifest(step_dir: str | Path, *, rank: int = 0, world: int = 1) -> bool:
    """Compare ``step_dir``'s files with its manifest; this rank hashes every ``world``-th file from ``rank`` on
    (the caller gathers the ranks' errors). Returns False (and warns, on rank 0) for a checkpoint without a
    manifest (written by an older version).

    Raises:
        CheckpointError: a file listed is missing, has another size or another sha256 (the message names it).
    """
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        if rank == 0:
            logger.warning("%s has no %s (written by an older version): its files are NOT verified", step_dir,
                           MANIFEST)
        return False
    manifest = read_json(path)
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise _refuse(path, f"not a manifest of format {MANIFEST_FORMAT}")
    fix = ("the file changed after the checkpoint was written (disk or copy error, or edited); resume from an "
           f"older checkpoint: write its step_* name into {step_dir.parent / 'latest'}, or move {step_dir.name} "
           "away (elas-train: or set checkpoint.fallback_to_verified=true to take the newest one that verifies)")
    for rel in sorted(files)[rank::world]:
        entry, file = files[rel], step_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise _refuse(path, f"lists a file outside the checkpoint ({rel!r})")
        if not file.is_file():
            raise CheckpointError(f"checkpoint {step_dir} failed verification: {file} is missing; {fix}")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"checkpoint {step_dir} failed verification: {file} has {size} bytes, the "
                                  f"manifest says {entry.get('size')}; {fix}")
        if _sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {step_dir} failed verification: {file} does not match the sha256 in "
                                  f"{MANIFEST}; {fix}")
    return True


def vet_checkpoint(step_dir: str | Path) -> None:
    """Refuse a checkpoint whose pickled parts hold anything but plain data (see the module docstring); every rank
    calls it before ``dist_checkpointing.load`` (after :func:`verify_manifest`)."""
    step_dir = Path(step_dir)
    mcore = read_json(step_dir / "metadata.json")
    if mcore.get("sharded_backend") != "torch_dist":
        raise _refuse(step_dir / "metadata.json", f"sharded_backend is {mcore.get('sharded_backend')!r}, not "
                                                  "'torch_dist' (the only format elas-megatron writes)")
    metadata = load_metadata(step_dir)
    _vet_objects(step_dir, metadata)
    if (step_dir / "common.pt").exists():
        torch_load_plain(step_dir / "common.pt", step_dir / "common.pt")


def resolve_latest(directory: str | Path) -> Path | None:
    """The step directory the ``latest`` pointer of ``directory`` names; None without a pointer.

    Raises:
        CheckpointError: ``latest`` names something other than a ``step_*`` directory inside ``directory``
            (an absolute path, ``..``, a path with separators): a pointer is never followed out of the directory.
    """
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name[:200]!r}, not a step_* directory of {Path(directory)}; "
                              "refusing to follow it (write the name of one of its step_* directories into it)")
    return Path(directory) / name
