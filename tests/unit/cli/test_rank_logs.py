"""Per-rank log files: every rank appends its log to RUN_DIR/logs/rank{R}.log; the console keeps rank 0's lines
and other ranks' warnings; the one-line errors of elas-train go to the file too."""
from __future__ import annotations

import logging

import pytest

from elas_megatron.utils.logging import init_logging, log_to_file_only, open_rank_log, rank_log_path


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_non_zero_rank_writes_info_to_its_file_and_only_warnings_to_the_console(tmp_path, capsys):
    init_logging("info", rank=1, log_dir=tmp_path / "logs")
    log = logging.getLogger("elas_megatron.test")
    log.info("step 3/3 | loss 4.2")
    log.warning("slow rank")
    log_to_file_only("elas-train: error: bad data")
    # nothing is written into the run directory until the trainer holds it; then everything so far is
    assert not (tmp_path / "logs").exists()
    assert open_rank_log() == rank_log_path(tmp_path / "logs", 1)
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = rank_log_path(tmp_path / "logs", 1).read_text()
    assert "[rank1] INFO elas_megatron.test: step 3/3 | loss 4.2" in text
    assert "[rank1] WARNING elas_megatron.test: slow rank" in text and "elas-train: error: bad data" in text
    err = capsys.readouterr().err
    assert "slow rank" in err and "step 3/3" not in err and "bad data" not in err


def test_rank_zero_logs_to_the_console_and_its_file_and_appends_across_restarts(tmp_path, capsys):
    for attempt in ("first", "second"):
        init_logging("info", rank=0, log_dir=tmp_path / "logs")
        logging.getLogger("elas_megatron.test").info("%s run", attempt)
        open_rank_log()
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "first run" in text and "second run" in text
    assert "second run" in capsys.readouterr().err
