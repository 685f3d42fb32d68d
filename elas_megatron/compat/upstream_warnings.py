"""The warnings megatron-core 0.16.1 raises while its own modules import, dropped right there and nowhere else.

Each entry names the module whose import raises it and says why nothing on our side can act on it. The first import
of that module runs under ``warnings.catch_warnings()`` with exactly these messages ignored (:func:`install`, called
by ``elas_megatron/__init__.py``), so the same message raised anywhere else, or any other warning raised during the
import, still shows. A module imported before :func:`install` ran keeps its warnings.

Raised at run time, not at import: :func:`ignore_row_parallel_forward_tp_group` (every forward of a stock
row-parallel layer) and :func:`dist_checkpoint_load_warnings_ignored` (loading a checkpoint).

This module imports neither torch nor megatron at import (the dry run must stay light).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import inspect
import re
import sys
import warnings

# module -> [(category, message regex, why it is dropped)]
UPSTREAM_IMPORT_WARNINGS: dict[str, list[tuple[type[Warning], str, str]]] = {
    "megatron.core": [
        (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated",
         "torch 2.10+ deprecates torch.jit; megatron-core's own modules still define jit-scripted helpers"),
        (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed",
         "megatron.core.inference.contexts warns about its own re-exports; we import nothing from it"),
        (UserWarning, r"Transformer Engine and Apex are not installed",
         "its optimizers and FSDP fall back to torch's, which is what a CPU or TE-less install means"),
    ],
    "megatron.core.models.gpt.gpt_layer_specs": [
        (UserWarning, r"Apex is not installed",
         "its local spec falls back to torch's norm, which is what the local spec means without Apex"),
    ],
    "megatron.core.models.backends": [
        (UserWarning, r"Apex is not installed", "the same fallback in the local backend's spec provider"),
    ],
    "megatron.core.transformer.custom_layers.transformer_engine": [
        (DeprecationWarning, r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'",
         "imported by megatron-core's own multi_latent_attention, which gpt_layer_specs imports; we never use it"),
    ],
}


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader's ``exec_module`` with the module's known warnings ignored."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with warnings.catch_warnings():
            for category, message, _why in UPSTREAM_IMPORT_WARNINGS[self._name]:
                warnings.filterwarnings("ignore", message=message, category=category)
            self._loader.exec_module(module)

    def __getattr__(self, attr):  # get_code, get_source, is_package, ... of the real loader
        return getattr(self._loader, attr)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in UPSTREAM_IMPORT_WARNINGS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, name)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def ignore_row_parallel_forward_tp_group() -> None:
    """Ignore "tp_group is None" raised from the one line of megatron-core that a stock ``RowParallelLinear``
    reaches on every forward.

    megatron-core 0.16.1's ``RowParallelLinear.forward`` passes ``tp_group=None`` to
    ``linear_with_grad_accumulation_and_async_allreduce`` (which needs no group there: it reduces afterwards), and
    that function's ``get_tensor_model_parallel_group_if_none`` warns (DeprecationWarning) on every forward of a
    full-rank row-parallel layer (the dense attention output and FFN down projection). The filter matches that
    call's module and line, found from the source, so the same warning from any other call still shows; a
    megatron-core without that call gets no filter. Called where a model is built (warning filters are
    process-wide; pytest restores them after each test).
    """
    from megatron.core.tensor_parallel import layers

    fn = layers.linear_with_grad_accumulation_and_async_allreduce
    lines, first = inspect.getsourcelines(fn)
    for offset, text in enumerate(lines):
        if "get_tensor_model_parallel_group_if_none(" in text:
            warnings.filterwarnings("ignore", message="Warning: tp_group is None", category=DeprecationWarning,
                                    module=re.escape(layers.__name__) + "$", lineno=first + offset)


DIST_CHECKPOINT_LOAD_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed",
     "megatron-core 0.16.1's torch dist-checkpoint strategy calls torch.distributed.checkpoint.load_state_dict"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "the same strategy builds torch ShardedTensors to load into; megatron-core, not our state dict, picks them"),
]


@contextlib.contextmanager
def dist_checkpoint_load_warnings_ignored():
    """Around ``megatron.core.dist_checkpointing.load``: its two FutureWarnings about torch APIs it calls (printed
    on every resume otherwise), and nothing else."""
    with warnings.catch_warnings():
        for category, message, _why in DIST_CHECKPOINT_LOAD_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
