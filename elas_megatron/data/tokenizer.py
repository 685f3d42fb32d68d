"""Sentencepiece tokenizers: loading one for training/prep, and training one on a corpus sample.

The papers we reproduce tokenize C4 with the T5 sentencepiece model (vocab 32000); LLaMA-style models use
sentencepiece too. Any sentencepiece ``.model`` works here, as long as it defines an EOS piece: the pipeline
appends EOS to every document so that Megatron's GPTDataset can pack documents into fixed-length samples.

:func:`train_tokenizer` trains LLaMA-style models by default (identity normalisation, byte fallback, digits
split, whitespace kept), because with those settings ``decode(encode(text)) == text`` holds exactly -- the
property our round-trip tests and the demo rely on. T5's model normalises (NFKC, whitespace folding), so its
round trip is exact only up to that normalisation.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer", "file_sha256"]

_TRAIN_HINT = ("create one with `elas-prep train-tokenizer --input CORPUS --model-prefix PATH/tokenizer` "
               "(or `python -m elas_megatron.data.demo` for the shipped demo tokenizer)")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file; identifies a tokenizer model in dataset metadata."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Tokenizer:
    """A sentencepiece model with the few properties the framework needs.

    Attributes:
        path: the ``.model`` file it was loaded from.
        vocab_size: number of pieces (token ids are ``0 .. vocab_size - 1``).
        eos_id: id appended after every document.
    """

    def __init__(self, processor, path: str, model_bytes: bytes) -> None:
        self._sp = processor
        self.path = path
        self._model_bytes = model_bytes
        self.vocab_size: int = int(processor.get_piece_size())
        self.eos_id: int = int(processor.eos_id())
        self.bos_id: int = int(processor.bos_id())
        self.pad_id: int = int(processor.pad_id())
        self.unk_id: int = int(processor.unk_id())
        self.sha256: str = hashlib.sha256(model_bytes).hexdigest()

    @property
    def model_bytes(self) -> bytes:
        """The serialized model, so worker processes can load it without touching the file again."""
        return self._model_bytes

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of several texts in one C++ call (much cheaper per document than :meth:`encode`)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; accepts lists, tuples and integer numpy arrays."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _processor_from_bytes(model_bytes: bytes, path: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError, TypeError) as err:
        raise ValueError(f"tokenizer {path} is not a readable sentencepiece model ({err}); point data.tokenizer / "
                         f"--tokenizer at a sentencepiece .model file, or {_TRAIN_HINT}") from None
    return sp


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a sentencepiece model.

    Args:
        path: the ``.model`` file (relative paths resolve against the current directory).

    Returns:
        The :class:`Tokenizer`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a sentencepiece model, or the model has no EOS piece.
    """
    path = str(path)
    if not os.path.isfile(path):
        where = f" (cwd {os.getcwd()})" if not os.path.isabs(path) else ""
        raise FileNotFoundError(f"tokenizer model {path}{where} does not exist; {_TRAIN_HINT}")
    with open(path, "rb") as f:
        model_bytes = f.read()
    sp = _processor_from_bytes(model_bytes, path)
    tok = Tokenizer(sp, path, model_bytes)
    if tok.eos_id < 0:
        raise ValueError(f"tokenizer {path} defines no EOS piece (eos_id=-1), but every document must end with "
                         "EOS; retrain it with `elas-prep train-tokenizer` (EOS id 2 by default)")
    return tok


def tokenizer_from_bytes(model_bytes: bytes, path: str = "<bytes>") -> Tokenizer:
    """Rebuild a :class:`Tokenizer` from :attr:`Tokenizer.model_bytes` (used in worker processes)."""
    return Tokenizer(_processor_from_bytes(model_bytes, path), path, model_bytes)


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
