"""Every shipped config and every composition of size x variant x layout loads and validates."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from elas_megatron.config import load_config

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
SIZES = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
VARIANTS = sorted(p.stem for p in (CONFIGS / "variant").glob("*.yaml"))
LAYOUTS = sorted(p.stem for p in (CONFIGS / "layout").glob("*.yaml"))


def test_the_paper_sizes_and_variants_are_all_there():
    assert {"60m", "130m", "350m", "1b", "3b", "7b"} <= set(SIZES)
    assert VARIANTS == ["cola", "dense", "elas"]


@pytest.mark.parametrize("size, variant, layout", list(itertools.product(SIZES, VARIANTS, LAYOUTS)))
def test_composition_validates(size, variant, layout):
    cfg = load_config([CONFIGS / "c4.yaml", CONFIGS / f"model/{size}.yaml", CONFIGS / f"variant/{variant}.yaml",
                       CONFIGS / f"layout/{layout}.yaml"])
    assert cfg.model.variant == variant
    assert cfg.train.global_batch == 512 and cfg.train.seq_len == 256 and cfg.optim.clip_grad == 0.5


def test_1b_dff_is_rounded_for_2_4_groups_at_every_tp():
    cfg = load_config([CONFIGS / "c4.yaml", CONFIGS / "model/1b.yaml", CONFIGS / "variant/elas.yaml"])
    assert cfg.model.ffn_hidden_size == 5472
    assert all(cfg.model.ffn_hidden_size % (4 * tp) == 0 for tp in (1, 2, 4, 8))


def test_demo_config():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.model.variant == "elas" and cfg.train.steps > 0
