"""A fourth variant defined entirely in this file: registered, built, counted, trained through the normal trainer,
exported, and unregistered -- one module is all a new variant needs.

``relu2``: full-rank LLaMA attention and a full-rank, non-gated squared-ReLU FFN (``down(relu(up(x)) ** 2)``, as
in Primer). It swaps no spec slot: megatron's own MLP runs it once the transformer config says "not gated, squared
ReLU". The standalone module represents it (its ``relu2`` FFN at full rank, no 2:4 selection); Hugging Face's
``LlamaForCausalLM`` (SwiGLU) cannot, which the variant declares.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from elas_megatron.cli.export import main as export_main
from elas_megatron.cli.train import main as train_main
from elas_megatron.config.schema import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig, validate
from elas_megatron.export.checkpoint import load_checkpoint
from elas_megatron.parallel.setup import destroy_parallel
from elas_megatron.variants import Variant, register, unregister, variant_names

REPO = Path(__file__).resolve().parents[3]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=96", "train.seq_len=32", "train.global_batch=4", "train.micro_batch=2",
        "train.eval_iters=2", "train.steps=3", "log.every=1", "optim.lr=1e-2", "optim.warmup_steps=1"]
DATA = [f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
        f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]


class Relu2Variant(Variant):
    """Full-rank attention, non-gated full-rank squared-ReLU FFN."""
    name = "relu2"
    description = "full-rank LLaMA attention, non-gated squared-ReLU FFN"
    standalone_mlp = "relu2"
    export_renames = {"mlp.linear_fc1.weight": "mlp.up_proj.weight"}   # not megatron's [gate; up]
    hf_reason = "has a non-gated squared-ReLU FFN"

    def gated(self, m):
        return False

    def activation(self, m):
        from megatron.core.activations import squared_relu

        return squared_relu

    def ffn_matrix_parameters(self, m, tp=1):
        return 2 * m.hidden_size * m.ffn_hidden_size // tp               # up, down

    def ffn_activation_terms(self, m, terms):
        f = m.ffn_hidden_size
        terms.add("act_in", terms.e * f / terms.tp, terms.ffn, "up(x), input of the squared ReLU")
        terms.add("fc2_in", terms.e * f / terms.tp, terms.ffn, "relu(up(x))^2, input of linear_fc2")


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def load_exported_module(directory: Path):
    """Import the export directory's own copy of modeling_elas.py."""
    spec = importlib.util.spec_from_file_location(f"modeling_elas_{directory.name}", directory / "modeling_elas.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def relu2():
    variant = register(Relu2Variant)
    yield variant
    unregister("relu2")
    destroy_parallel()


def test_it_is_a_config_value_and_counts_itself(relu2, megatron_world):
    from elas_megatron.models.flops import count_parameters, flops_per_token
    from elas_megatron.models.gpt import build_model
    from elas_megatron.training.memory import estimate_memory

    megatron_world()
    assert "relu2" in variant_names()
    cfg = Config(model=ModelConfig(variant="relu2", hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48),
                 train=TrainConfig(seq_len=16, device="cpu", global_batch=2, micro_batch=2))
    validate(cfg, world_size=1)
    model = build_model(cfg, vocab_size=64)
    mlp = model.decoder.layers[0].mlp
    assert type(mlp).__name__ == "MLP" and tuple(mlp.linear_fc1.weight.shape) == (48, 32)   # not gated
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg.model, 64)["total"]
    assert flops_per_token(cfg.model, 64, 16) > 0
    assert estimate_memory(cfg, world_size=1, vocab_size=64).peak.activations > 0
    with pytest.raises(ConfigError, match="model.ffn_hidden_size=48 is invalid: expected divisible by parallel.tp=5"):
        relu2.validate(cfg.model, ParallelConfig(tp=5))


@pytest.fixture(scope="module")
def trained(relu2, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("relu2")
    assert train_main([str(REPO / "configs/demo.yaml"), *TINY, *DATA, "model.variant=relu2",
                       f"train.run_dir={run_dir}"]) == 0
    return run_dir


def test_trains_through_the_trainer(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not any("sparse24" in r for r in records)              # no 2:4 sparsity: nothing to log
    assert (trained / "checkpoints" / "latest").is_file()


def test_exports_to_the_standalone_module_with_equal_logits(trained, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_main([str(trained), str(out)]) == 0             # --format auto: torch (not a LLaMA network)
    assert "exported relu2 step 3" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["variant"] == "relu2" and config["mlp"] == "relu2" and config["rank"] == 0
    exported = load_exported_module(out).ElasForCausalLM.from_pretrained(out)
    ours = load_checkpoint(trained).model
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported(x), megatron_logits(ours, x), rtol=1e-5, atol=1e-5)
    destroy_parallel()


def test_hugging_face_format_is_a_clear_error(trained, tmp_path, capsys):
    assert export_main([str(trained), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["elas-export: error: model.variant='relu2' has a non-gated squared-ReLU FFN, which "
                   "LlamaForCausalLM cannot hold; export it with --format torch (state dict + standalone "
                   "inference module)"]
