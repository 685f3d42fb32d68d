"""Layer specs of the variants: only the intended slots of megatron's stock local spec are swapped."""
from __future__ import annotations

import logging

import pytest
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.mlp import MLP

from elas_megatron.config.schema import ModelConfig
from elas_megatron.layers import specs
from elas_megatron.layers.attention import SDPAttention
from elas_megatron.layers.low_rank import LowRankQKVColumnParallelLinear, LowRankRowParallelLinear
from elas_megatron.layers.mlp import ColaMLP, ElasMLP
from elas_megatron.layers.norm import RMSNorm
from elas_megatron.variants import get_variant



def _spec(model: ModelConfig, **kwargs):
    """The layer spec of ``model``'s variant (as ``build_gpt`` asks for it)."""
    return specs.get_layer_spec(model, get_variant(model.variant), **kwargs)

def _model(variant: str, **kw) -> ModelConfig:
    return ModelConfig(variant=variant, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48, rank=8, **kw)


def _get(slot):
    return slot.module if hasattr(slot, "module") else slot


def _slots(spec):
    layer = spec.submodules
    attn = layer.self_attention.submodules
    get = _get
    return {"qkv": get(attn.linear_qkv), "proj": get(attn.linear_proj), "core": get(attn.core_attention),
            "mlp": get(layer.mlp), "norm": get(layer.input_layernorm), "pre_mlp": get(layer.pre_mlp_layernorm)}


def test_dense_is_megatrons_local_spec():
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    # the one addition: the FFN width megatron's MLP would take from the config, given explicitly (no warning)
    stock.submodules.mlp.params = {"ffn_hidden_size": 48}
    assert repr(_spec(_model("dense"), attention_backend="local")) == repr(stock)


def test_every_mlp_of_megatrons_class_gets_its_width():
    for variant in ("dense", "cola"):
        for parts in ("fused", "separate"):
            mlp = _spec(_model(variant, lowrank_parts=parts), attention_backend="local").submodules.mlp
            assert issubclass(mlp.module, MLP) and mlp.params["ffn_hidden_size"] == 48


def test_variants_swap_only_their_slots(caplog, monkeypatch):
    monkeypatch.setattr(specs, "_logged", set())  # each swap is logged once per process
    stock = _slots(get_gpt_layer_local_spec(normalization="RMSNorm"))
    with caplog.at_level(logging.INFO, logger="elas_megatron.layers.specs"):
        cola = _slots(_spec(_model("cola"), attention_backend="local"))
        elas = _slots(_spec(_model("elas"), attention_backend="local"))
    assert cola == dict(stock, qkv=LowRankQKVColumnParallelLinear, proj=LowRankRowParallelLinear, mlp=ColaMLP)
    assert elas == dict(cola, mlp=ElasMLP)
    fused_parts = _slots(_spec(_model("cola", lowrank_parts="fused"), attention_backend="local"))
    assert fused_parts == dict(cola, mlp=MLP)  # megatron's own MLP when gate and up are concatenated
    assert "elas.mlp: MLP -> ElasMLP" in caplog.text and "2:4 masked-grad" in caplog.text
    full_attention = _slots(_spec(_model("elas", lowrank_attention=False), attention_backend="local"))
    assert full_attention == dict(stock, mlp=ElasMLP)


def test_attention_backend_and_sequence_parallel_swaps():
    s = _slots(_spec(_model("dense"), attention_backend="sdpa", sequence_parallel=True))
    assert s["core"] is SDPAttention and s["norm"] is RMSNorm and s["pre_mlp"] is RMSNorm
    assert specs.get_final_norm(_model("dense"), sequence_parallel=True) is RMSNorm
    assert specs.resolve_attention_backend("auto", "cpu") == "local"
    assert specs.resolve_attention_backend("auto", "cuda") == "sdpa"


def test_unknown_names_list_the_valid_ones():
    bad = _model("dense")
    bad.variant = "moe"
    with pytest.raises(ValueError, match=r"model.variant='moe' is invalid: choose one of 'dense', 'cola', 'elas'"):
        _spec(bad, attention_backend="local")
    with pytest.raises(ValueError, match="choose one of"):
        _spec(_model("dense"), attention_backend="flash")


@pytest.mark.skipif(specs.te_available(), reason="Transformer Engine is installed")
def test_te_spec_without_te_is_a_clear_error():
    with pytest.raises(ImportError, match="model.spec=te needs Transformer Engine"):
        _spec(_model("elas", spec="te"), attention_backend="local")
