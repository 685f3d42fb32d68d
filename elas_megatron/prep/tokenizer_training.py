"""Training a LLaMA-style sentencepiece tokenizer (``elas-prep train-tokenizer``); training only loads one
(:func:`elas_megatron.data.tokenizer.load_tokenizer`).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["train_tokenizer"]

logger = logging.getLogger(__name__)


def _training_lines(texts: Iterable[str], max_line_bytes: int) -> Iterator[str]:
    # Sentencepiece trains on "sentences"; C4 documents are paragraphs separated by newlines, so each
    # non-empty paragraph is one sentence. Over-long paragraphs are cut rather than silently dropped
    # (sentencepiece skips sentences longer than max_sentence_length).
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_line_bytes:
                cut = max_line_bytes // 4  # characters; at most 4 bytes each, so the piece fits
                yield line[:cut]
                line = line[cut:]
            yield line


def train_tokenizer(texts: Iterable[str], model_prefix: str, *, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 0.9995, byte_fallback: bool = True, newline_piece: bool = True,
                    max_sentences: int = 2_000_000, seed: int = 1234, num_threads: int | None = None) -> str:
    """Train a LLaMA-style sentencepiece model on ``texts``.

    Args:
        texts: documents (each may hold several newline-separated paragraphs).
        model_prefix: output path without suffix; writes ``{model_prefix}.model`` and ``.vocab``.
        vocab_size: number of pieces, including the specials ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` (EOS) = 2.
        model_type: ``unigram`` (as T5/LLaMA) or ``bpe``.
        character_coverage: fraction of characters covered by pieces; the rest use byte fallback.
        byte_fallback: encode unknown characters as UTF-8 bytes, so no text is ever lost to ``<unk>``.
        newline_piece: make ``"\\n"`` a piece of its own (C4 separates paragraphs with it).
        max_sentences: paragraphs sentencepiece keeps (a uniform sample when there are more).
        seed: sentencepiece's sampling seed.
        num_threads: trainer threads (None = all cores).

    Returns:
        The path of the ``.model`` file.

    Raises:
        ValueError: the corpus is empty or too small for ``vocab_size`` (the message gives the maximum).
    """
    import sentencepiece as spm

    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    max_line_bytes = 4096
    lines = _training_lines(texts, max_line_bytes)
    try:
        first = next(lines)
    except StopIteration:
        raise ValueError("the tokenizer training corpus has no non-empty text; check --input") from None

    def _all_lines() -> Iterator[str]:
        yield first
        yield from lines

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_all_lines(), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"] if newline_piece else [], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=max_line_bytes,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:
        msg = str(err)
        limit = re.search(r"value <= (\d+)", msg)
        if "Vocabulary size too high" in msg and limit:
            raise ValueError(f"vocab_size={vocab_size} is too large for this corpus sample (sentencepiece can build "
                             f"at most {limit.group(1)} pieces from it); use a smaller --vocab-size or sample more "
                             "text (--sample-docs)") from None
        raise ValueError(f"sentencepiece training failed: {msg}") from None
    model_path = f"{model_prefix}.model"
    logger.info("trained %s tokenizer with %d pieces -> %s", model_type, vocab_size, model_path)
    return model_path
