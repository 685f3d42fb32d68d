"""docs/configs.md is the generator's output.

Regenerate it with ``python -m elas_megatron.cli.config_table --write docs/configs.md``.
"""
from __future__ import annotations

from pathlib import Path

from elas_megatron.cli.config_table import main, render

REPO = Path(__file__).resolve().parents[3]


def test_docs_configs_md_is_up_to_date():
    assert main(["--check", str(REPO / "docs/configs.md")]) == 0


def test_table_lists_every_model_and_variant_and_layout():
    text = render()
    for model in (REPO / "configs/model").glob("*.yaml"):
        for variant in ("dense", "cola", "elas"):
            assert f"| {model.stem} | {variant} |" in text
    for layout in (REPO / "configs/layout").glob("*.yaml"):
        assert f"| {layout.stem} |" in text
    # the 1B row reproduces the parameter counts of docs/model.md (CoLA's reported 1339M / 609M)
    assert "| 1b | dense | 1340.7 |" in text and "| 1b | cola | 609.7 |" in text


def test_check_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configs.md"
    stale.write_text("old\n")
    assert main(["--check", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err


def test_every_log_option_is_listed_with_its_documentation():
    from dataclasses import fields

    from elas_megatron.cli.config_table import field_docs
    from elas_megatron.config.schema import LogConfig

    text, docs = render(), field_docs(LogConfig)
    for f in fields(LogConfig):
        assert docs[f.name], f"log.{f.name} has no field docstring"
        assert f"| `log.{f.name}` |" in text
