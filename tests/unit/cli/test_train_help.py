"""``elas-train --help`` names every log option."""
from __future__ import annotations

from dataclasses import fields

import pytest

from elas_megatron.cli.train import main
from elas_megatron.config.schema import LogConfig


def test_help_lists_every_log_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(LogConfig):
        assert f"log.{f.name}" in text
