"""Sentencepiece tokenizers: loading one for training and data preparation (training one is
:mod:`elas_megatron.prep.tokenizer_training`).

The papers we reproduce tokenize C4 with the T5 sentencepiece model (vocab 32000); LLaMA-style models use
sentencepiece too. Any sentencepiece ``.model`` works here, as long as it defines an EOS piece: the pipeline
appends EOS to every document so that Megatron's GPTDataset can pack documents into fixed-length samples.

``train_tokenizer`` trains LLaMA-style models by default (identity normalisation, byte fallback, digits
split, whitespace kept), because with those settings ``decode(encode(text)) == text`` holds exactly -- the
property our round-trip tests and the demo rely on. T5's model normalises (NFKC, whitespace folding), so its
round trip is exact only up to that normalisation.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_from_bytes", "file_sha256"]

_TRAIN_HINT = ("create one with `elas-prep train-tokenizer --input CORPUS --model-prefix PATH/tokenizer` "
               "(or `python -m elas_megatron.prep.demo` for the shipped demo tokenizer)")


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
