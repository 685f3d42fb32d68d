# SPDX-License-Identifier: Apache-2.0
"""Exception types raised at several layers of the package.

Why here: a config value is checked by the component that owns it (the variant's rules, for instance), and those
components sit below :mod:`elas_megatron.config`, which composes their settings; they raise the same
:class:`ConfigError` that :mod:`elas_megatron.config.schema` re-exports.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, does not fit this run, or is refused on load (damaged, not verifiable, or
    holding something other than data); the message names the file and the fix. Re-exported by
    :mod:`elas_megatron.training.checkpoint`."""


class DataError(ValueError):
    """The training data holds what the model cannot take (a token id outside the vocabulary); the message names
    the data file, the document, the sample and the step, and the fix. Raised by
    :mod:`elas_megatron.data.loader`."""
