# SPDX-License-Identifier: Apache-2.0
"""Model variants: one module per variant owns everything variant-specific (docs/model.md, "Variants").

* :mod:`~elas_megatron.variants.base`: the :class:`Variant` interface (defaults = ``dense``).
* :mod:`~elas_megatron.variants.registry`: :func:`register`, :func:`unregister`, :func:`get_variant`,
  :func:`variant_names`; ``model.variant`` is validated against it.
* :mod:`~elas_megatron.variants.dense`, :mod:`~elas_megatron.variants.cola`, :mod:`~elas_megatron.variants.elas`:
  the built-in variants.
"""
from elas_megatron.variants.base import ExportUnsupportedError, Variant
from elas_megatron.variants.registry import (UnknownVariantError, get_variant, register, unregister,
                                             variant_names)

__all__ = ["ExportUnsupportedError", "UnknownVariantError", "Variant", "get_variant", "register",
           "unregister", "variant_names"]
