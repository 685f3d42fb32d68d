"""Tokenizer loading errors, exact round trips, and training a tokenizer on a corpus sample."""
from __future__ import annotations

import pytest
from c4_testdata import DEMO_TOKENIZER, generate_docs

from elas_megatron.data.tokenizer import load_tokenizer


def test_demo_tokenizer_properties(demo_tokenizer):
    assert demo_tokenizer.vocab_size == 4096
    assert demo_tokenizer.eos_id == 2
    assert demo_tokenizer.id_to_piece(demo_tokenizer.eos_id) == "</s>"


@pytest.mark.parametrize("text", ["plain text.", "  leading and  doubled spaces, trailing  ", "tab\there\nand\n\nlines",
                                  "unicode: café naïve Straße 日本語 🙂", "", " ", "\r\nCRLF\r\n", "digits 0123456789"])
def test_round_trip_is_exact(demo_tokenizer, text):
    ids = demo_tokenizer.encode(text)
    assert demo_tokenizer.decode(ids) == text
    assert demo_tokenizer.eos_id not in ids


def test_decode_accepts_numpy(demo_tokenizer):
    import numpy as np

    ids = demo_tokenizer.encode("numpy arrays of uint16")
    assert demo_tokenizer.decode(np.array(ids, dtype=np.uint16)) == "numpy arrays of uint16"


def test_missing_model_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*elas-prep train-tokenizer"):
        load_tokenizer(tmp_path / "nope.model")


def test_garbage_model_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match=r"bad\.model is not a readable sentencepiece model"):
        load_tokenizer(bad)


def test_model_without_eos_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(generate_docs(200)), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=200, eos_id=-1, minloglevel=2, num_threads=1)
    with pytest.raises(ValueError, match="no EOS piece"):
        load_tokenizer(tmp_path / "noeos.model")


def test_shipped_tokenizer_file_exists():
    assert DEMO_TOKENIZER.is_file()
