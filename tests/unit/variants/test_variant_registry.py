"""The variant registry: names, lookups, clear errors, and the config validating ``model.variant`` against it."""
from __future__ import annotations

import pytest

from elas_megatron.config.loader import load_config
from elas_megatron.config.schema import ConfigError, ModelConfig
from elas_megatron.variants import (UnknownVariantError, Variant, get_variant, register, unregister,
                                    variant_names)
from elas_megatron.variants.cola import ColaVariant
from elas_megatron.variants.dense import DenseVariant
from elas_megatron.variants.elas import ElasVariant


class _Plain(Variant):
    name = "plain-test"


@pytest.fixture
def plain():
    variant = register(_Plain)
    yield variant
    if "plain-test" in variant_names():
        unregister("plain-test")


def test_builtins_are_registered_in_order():
    assert variant_names()[:3] == ("dense", "cola", "elas")
    assert isinstance(get_variant("dense"), DenseVariant)
    assert isinstance(get_variant("cola"), ColaVariant)
    assert isinstance(get_variant("elas"), ElasVariant)


def test_what_the_builtins_declare():
    dense, cola, elas = (get_variant(n) for n in ("dense", "cola", "elas"))
    m = ModelConfig()
    assert (dense.lowrank, cola.lowrank, elas.lowrank) == (False, True, True)
    assert (dense.sparsity, cola.sparsity, elas.sparsity) == (False, False, True)
    assert (dense.gated(m), cola.gated(m), elas.gated(m)) == (True, True, False)
    assert [v.default_export_format() for v in (dense, cola, elas)] == ["hf", "torch", "torch"]
    assert (dense.standalone_mlp, cola.standalone_mlp, elas.standalone_mlp) == ("swiglu", "swiglu", "relu2")
    assert dense.dense_warmup_steps(ModelConfig(variant="dense", dense_warmup_steps=5)) == 0
    assert elas.dense_warmup_steps(ModelConfig(variant="elas", dense_warmup_steps=5)) == 5
    assert elas.ffn_multiple(m) == 4 and cola.ffn_multiple(m) == 1


def test_unknown_name_is_one_line_naming_the_known_variants():
    with pytest.raises(UnknownVariantError) as info:
        get_variant("moe")
    assert str(info.value) == "model.variant='moe' is invalid: choose one of 'dense', 'cola', 'elas'"
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownVariantError, match="choose one of"):
        unregister("moe")


def test_register_and_unregister(plain):
    assert variant_names()[-1] == "plain-test" and get_variant("plain-test") is plain
    assert ModelConfig(variant="plain-test").variant == "plain-test"
    with pytest.raises(ValueError, match="registered already"):
        register(_Plain)
    assert register(_Plain(), replace=True) is not plain
    assert unregister("plain-test").name == "plain-test"
    assert "plain-test" not in variant_names()
    with pytest.raises(ConfigError, match="model.variant='plain-test' is invalid: choose one of 'dense'"):
        ModelConfig(variant="plain-test")


def test_a_variant_needs_a_name():
    class Nameless(Variant):
        pass

    with pytest.raises(ValueError, match="has no name"):
        register(Nameless)


def test_config_validates_the_variant_against_the_registry():
    with pytest.raises(ConfigError, match="model.variant='moe' is invalid: choose one of 'dense', 'cola', 'elas'"):
        load_config(None, ["model.variant=moe"])
    with pytest.raises(ConfigError, match="model.variant='moe' is invalid"):
        ModelConfig(variant="moe")


def test_kernel_backend_is_a_config_key():
    assert load_config(None, ["model.kernel_backend=reference"]).model.kernel_backend == "reference"
    with pytest.raises(ConfigError, match="model.kernel_backend='cuda' is invalid: choose one of 'auto'"):
        load_config(None, ["model.kernel_backend=cuda"])


def test_export_formats_a_variant_cannot_hold_are_clear_errors():
    with pytest.raises(ValueError, match="'cola' has low-rank layers, which LlamaForCausalLM cannot hold; "
                                         "export it with --format torch"):
        get_variant("cola").check_export("hf")
    get_variant("dense").check_export("hf")
    get_variant("elas").check_export("torch")
