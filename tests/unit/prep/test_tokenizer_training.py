"""Training a sentencepiece tokenizer (elas-prep train-tokenizer)."""
from __future__ import annotations

import pytest
from c4_testdata import generate_docs

from elas_megatron.data.tokenizer import load_tokenizer
from elas_megatron.prep.tokenizer_training import train_tokenizer


def test_train_tokenizer_llama_style(tmp_path):
    docs = generate_docs(300, seed=7)
    path = train_tokenizer(docs, str(tmp_path / "sub" / "tok"), vocab_size=400, num_threads=1)
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 0, 1, 2, -1)
    assert "\n" in [tok.id_to_piece(i) for i in tok.encode("a\nb")]  # newline is a piece of its own
    for doc in docs[:50]:
        assert tok.decode(tok.encode(doc)) == doc
    # unseen characters survive through byte fallback
    assert tok.decode(tok.encode("Ωμέγα ✓")) == "Ωμέγα ✓"


def test_train_tokenizer_too_large_vocab_says_the_maximum(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=50000 is too large for this corpus sample \(sentencepiece "
                                         r"can build at most \d+ pieces"):
        train_tokenizer(generate_docs(50), str(tmp_path / "tok"), vocab_size=50000, num_threads=1)


def test_train_tokenizer_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "\n\n"], str(tmp_path / "tok"), vocab_size=100)
