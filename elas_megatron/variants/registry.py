# SPDX-License-Identifier: Apache-2.0
"""The variant registry: ``model.variant`` name -> :class:`~elas_megatron.variants.base.Variant`.

The built-in variants (``dense``, ``cola``, ``elas``) register themselves on first use; a new variant is one
module with a ``Variant`` subclass and a :func:`register` call (see docs/model.md, "Variants").
"""
from __future__ import annotations

from elas_megatron.variants.base import Variant

__all__ = ["UnknownVariantError", "get_variant", "register", "unregister", "variant_names"]

_REGISTRY: dict[str, Variant] = {}
_builtins_loaded = False


class UnknownVariantError(ValueError):
    """``model.variant`` names no registered variant."""


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from elas_megatron.variants.cola import ColaVariant
        from elas_megatron.variants.dense import DenseVariant
        from elas_megatron.variants.elas import ElasVariant

        for builtin in (DenseVariant, ColaVariant, ElasVariant):
            register(builtin)


def register(variant: Variant | type[Variant], *, replace: bool = False) -> Variant:
    """Add a variant (an instance, or a class that is instantiated without arguments); returns the instance.

    Usable as a class decorator only through ``register(MyVariant)``: the class itself is not returned.

    Raises:
        ValueError: a variant of that name is registered already (unless ``replace``), or it has no name.
    """
    _ensure_builtins()
    if isinstance(variant, type):
        variant = variant()
    name = getattr(variant, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{variant!r} has no name: set the class attribute `name`")
    if name in _REGISTRY and not replace:
        raise ValueError(f"variant {name!r} is registered already ({_REGISTRY[name]!r}); unregister it first")
    _REGISTRY[name] = variant
    return variant


def unregister(name: str) -> Variant:
    """Remove a variant; returns it. Raises :class:`UnknownVariantError` for an unknown name."""
    get_variant(name)
    return _REGISTRY.pop(name)


def variant_names() -> tuple[str, ...]:
    """Registered names, in registration order (the built-ins first: dense, cola, elas)."""
    _ensure_builtins()
    return tuple(_REGISTRY)


def unknown_variant_message(name: object) -> str:
    return f"model.variant={name!r} is invalid: choose one of {', '.join(map(repr, variant_names()))}"


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; :class:`UnknownVariantError` (one line naming the known ones) if none."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownVariantError(unknown_variant_message(name)) from None
