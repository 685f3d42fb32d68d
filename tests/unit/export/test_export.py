"""Export: megatron -> LLaMA names, the standalone module and Hugging Face LlamaForCausalLM reproduce our logits.

The end-to-end tests train 2 steps on the demo corpus, export the checkpoint with ``elas-export`` and compare the
exported model's logits with those of our model loaded from the same checkpoint; ``elas-eval`` must reproduce the
validation loss the trainer logged at that step.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from elas_megatron.cli.eval import main as eval_main
from elas_megatron.cli.export import main as export_main
from elas_megatron.cli.train import main as train_main
from elas_megatron.config.schema import Config, ModelConfig, TrainConfig
from elas_megatron.export.checkpoint import load_checkpoint, resolve_checkpoint
from elas_megatron.export.hf import standalone_config, to_llama_state_dict
from elas_megatron.export.modeling_elas import ElasConfig, ElasForCausalLM, sparse24
from elas_megatron.parallel.setup import destroy_parallel
from elas_megatron.sparsity import sparse24 as sparse24_reference

REPO = Path(__file__).resolve().parents[3]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=128", "model.rank=16", "train.seq_len=32", "train.global_batch=4",
        "train.micro_batch=2", "train.eval_iters=2", "train.steps=2", "model.dense_warmup_steps=0", "log.every=1"]
DATA = [f"data.tokenizer={REPO / 'data/demo/tokenizer.model'}",
        f"data.train_prefixes=[{REPO / 'data/demo/tokens/demo_text_document'}]"]
SEQ, VOCAB = 32, 4096


def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, None)


def tokens(vocab: int = VOCAB, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant, options", [
    ("dense", {}), ("dense", {"num_kv_heads": 4}), ("cola", {}), ("cola", {"lowrank_attention": False}),
    ("elas", {}), ("elas", {"lowrank_activation": "identity"}), ("elas", {"sparse24": False}),
])
def test_renamed_state_dict_gives_the_same_logits_in_the_standalone_module(megatron_world, variant, options):
    from elas_megatron.models.gpt import build_model

    megatron_world()
    shape = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 48, "rank": 8}
    cfg = Config(model=ModelConfig(variant=variant, **{**shape, **options}),
                 train=TrainConfig(seq_len=16, device="cpu"))
    model = build_model(cfg, vocab_size=64).eval()
    state = to_llama_state_dict(model.state_dict(), cfg)
    standalone = ElasForCausalLM(ElasConfig.from_dict(standalone_config(cfg, 64, sparse24=cfg.model.sparse24)))
    standalone.load_state_dict(state)                     # strict: every name maps, nothing is left over
    x = tokens(64, seq=16)
    torch.testing.assert_close(standalone.eval()(x), megatron_logits(model, x), rtol=1e-5, atol=1e-5)


def test_standalone_sparse24_is_the_reference_selection():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x[:8] = torch.tensor([1.0, -1.0, 1.0, 0.5]).repeat(8, 32)          # ties: lower index wins
    x[8:16] = 0.0
    assert torch.equal(sparse24(x), sparse24_reference(x))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2-step runs of every variant on the demo corpus, each with its final checkpoint and metrics."""
    runs = {}
    for variant in ("dense", "cola", "elas"):
        run_dir = tmp_path_factory.mktemp(variant)
        assert train_main([str(REPO / "configs/demo.yaml"), *TINY, *DATA, f"model.variant={variant}",
                           f"train.run_dir={run_dir}"]) == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[variant] = (run_dir, [r for r in records if "val_loss" in r][-1]["val_loss"])
    return runs


def load_exported_module(directory: Path):
    """Import the export directory's own modeling_elas.py (the copy, not the package's)."""
    spec = importlib.util.spec_from_file_location(f"modeling_elas_{directory.name}", directory / "modeling_elas.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["cola", "elas"])
def test_low_rank_export_is_a_state_dict_with_a_standalone_module(trained, tmp_path, variant, capsys):
    run_dir, _ = trained[variant]
    out = tmp_path / "export"
    assert export_main([str(run_dir), str(out)]) == 0
    assert f"exported {variant} step 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt", "modeling_elas.py", "tokenizer.model"]
    exported = load_exported_module(out).ElasForCausalLM.from_pretrained(out)
    ours = load_checkpoint(run_dir).model
    x = tokens()
    torch.testing.assert_close(exported(x), megatron_logits(ours, x), rtol=1e-5, atol=1e-5)
    destroy_parallel()


def test_dense_export_is_a_hugging_face_llama_with_equal_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, _ = trained["dense"]
    out = tmp_path / "hf"
    assert export_main([str(run_dir / "checkpoints"), str(out)]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings is False
    ours = load_checkpoint(run_dir).model
    x = tokens()
    with torch.no_grad():
        theirs = hf(x).logits
    torch.testing.assert_close(theirs, megatron_logits(ours, x), rtol=1e-5, atol=1e-5)
    destroy_parallel()


def test_elas_eval_reproduces_the_trainers_validation_loss(trained, tmp_path, capsys):
    run_dir, val_loss = trained["elas"]
    result = tmp_path / "eval.json"
    assert eval_main([str(run_dir), "--json", str(result)]) == 0
    got = json.loads(result.read_text())
    assert got["step"] == 2 and got["tokens"] == 2 * 2 * SEQ
    assert got["loss"] == pytest.approx(val_loss, rel=1e-6)
    assert "perplexity" in capsys.readouterr().out
    # a held-out prefix, every sample once
    assert eval_main([str(run_dir), "--data", str(REPO / "data/demo/tokens/demo_text_document"), "--iters", "3",
                      "--json", str(result)]) == 0
    assert json.loads(result.read_text())["tokens"] == 3 * 2 * SEQ


def test_errors_are_one_line_and_exit_2(trained, tmp_path, capsys):
    run_dir, _ = trained["cola"]
    assert export_main([str(run_dir), str(tmp_path / "x"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot hold; export it with --format torch" in err[0]   # before anything is loaded
    assert eval_main([str(tmp_path / "nothing")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path)
