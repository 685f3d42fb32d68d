# SPDX-License-Identifier: Apache-2.0
"""Exception types raised at several layers of the package.

Why here: a config value is checked by the component that owns it (the variant's rules, for instance), and those
components sit below :mod:`elas_megatron.config`, which composes their settings; they raise the same
:class:`ConfigError` that :mod:`elas_megatron.config.schema` re-exports.
"""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and the fix."""
