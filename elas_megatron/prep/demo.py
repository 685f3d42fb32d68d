"""The shipped demo corpus: license-clean English from CPython's own documentation, in C4's format.

The demo (and CI) must train with no network, so the repository ships a small corpus under ``data/demo/``:
the ``pydoc_data`` topics (the text of ``help('if')`` and friends) and the docstrings of a fixed list of standard
library modules, both part of CPython and under the PSF License. It is written exactly like a C4 shard (gzip JSON
lines with ``text``, ``timestamp``, ``url``) and then goes through the same pipeline as C4 -- ``elas-prep
train-tokenizer`` and ``elas-prep tokenize`` -- so the demo exercises the real code path.

``python -m elas_megatron.prep.demo`` rebuilds all three artefacts (``data_prep/build_demo.sh`` wraps it). The
corpus text depends on the CPython version that generates it (docstrings change between releases), so
``data/demo/README.md`` records the version used; tokenizing the shipped corpus is reproducible anywhere, and a
test checks the shipped tokens against a fresh tokenization.
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import json
import logging
import os
import platform
import random
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["DEMO_DIR", "demo_documents", "write_corpus", "build_demo", "main"]

DEMO_DIR = Path("data/demo")
CORPUS_NAME = "demo.json.gz"
TOKENIZER_PREFIX = "tokenizer"
TOKENS_DIR = "tokens/"  # -> tokens/demo_text_document, the default data.train_prefixes
VOCAB_SIZE = 4096

# Pure-Python or long-stable modules with substantial English docstrings; a fixed list keeps the corpus stable.
MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.futures", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bdb", "bisect", "calendar", "cmd", "code", "codecs", "collections", "collections.abc",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "doctest", "email.headerregistry", "email.message", "email.parser", "email.policy", "email.utils", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "importlib.abc",
    "importlib.metadata", "inspect", "io", "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "multiprocessing.managers", "multiprocessing.pool", "numbers",
    "operator", "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "pstats", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.handler", "zipfile",
)
_MIN_DOC_CHARS = 200


def _docstring(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _module_documents(name: str) -> Iterator[tuple[str, str]]:
    """(url, text) documents of one module: one for the module and its functions, one per public class."""
    module = importlib.import_module(name)
    functions, classes = [], []
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            classes.append((attr, obj))
        elif callable(obj) and _docstring(obj):
            functions.append(f"{name}.{attr}\n\n{_docstring(obj)}")
    head = _docstring(module)
    text = "\n\n".join(p for p in [f"Module {name}\n\n{head}" if head else ""] + functions if p)
    if len(text) >= _MIN_DOC_CHARS:
        yield f"python-stdlib://{name}", text
    for attr, cls in classes:
        parts = [f"class {name}.{attr}\n\n{_docstring(cls)}"] if _docstring(cls) else []
        for method, member in sorted(vars(cls).items()):
            if method.startswith("_") or not _docstring(member) or _docstring(member) == _docstring(cls):
                continue
            parts.append(f"{attr}.{method}\n\n{_docstring(member)}")
        text = "\n\n".join(parts)
        if len(text) >= _MIN_DOC_CHARS:
            yield f"python-stdlib://{name}#{attr}", text


def demo_documents() -> list[dict[str, str]]:
    """The demo corpus as C4 records (``text``, ``timestamp``, ``url``), in a fixed order.

    Call it in a fresh interpreter (as ``python -m elas_megatron.prep.demo`` does): some libraries, torch among
    them, replace standard-library functions such as ``inspect.getfile``, which changes what a module owns.
    """
    import pydoc_data.topics

    docs: list[tuple[str, str]] = [(f"python-stdlib://pydoc_data.topics/{key}", text.strip())
                                   for key, text in sorted(pydoc_data.topics.topics.items())]
    with warnings.catch_warnings():  # e.g. typing.io's deprecation notice when its docstring is read
        warnings.simplefilter("ignore")
        for name in MODULES:
            docs.extend(_module_documents(name))
    unique, seen = [], set()
    for url, text in docs:  # a few docstrings are shared (e.g. aliases); keep the first
        if text not in seen:
            seen.add(text)
            unique.append((url, text))
    # A fixed shuffle, as in a C4 shard: data.split takes its validation documents from the end, which must not be
    # the alphabetically last modules.
    random.Random(0).shuffle(unique)
    records = []
    for i, (url, text) in enumerate(unique):
        # C4's timestamps are crawl times; ours are synthetic but deterministic and in C4's format.
        timestamp = f"2019-04-{1 + i % 28:02d}T{i % 24:02d}:{i * 7 % 60:02d}:{i * 13 % 60:02d}Z"
        records.append({"text": text, "timestamp": timestamp, "url": url})
    return records


def write_corpus(path: str | os.PathLike, records: list[dict[str, str]]) -> None:
    """Write records as one gzip JSON-lines shard with fixed gzip header fields (byte-reproducible)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def build_demo(out_dir: str | os.PathLike = DEMO_DIR, *, corpus: bool = True, tokenizer: bool = True,
               tokens: bool = True) -> None:
    """Rebuild the demo corpus, its tokenizer and its tokenized dataset (each step optional)."""
    from elas_megatron.prep.pipeline import TokenizeOptions, tokenize_corpus
    from elas_megatron.prep.sources import expand_inputs, iter_texts
    from elas_megatron.data.tokenizer import load_tokenizer
    from elas_megatron.prep.tokenizer_training import train_tokenizer

    out_dir = Path(out_dir)
    corpus_path = out_dir / CORPUS_NAME
    if corpus:
        records = demo_documents()
        write_corpus(corpus_path, records)
        chars = sum(len(r["text"]) for r in records)
        logger.info("wrote %s: %d documents, %d characters (CPython %s)", corpus_path, len(records), chars,
                    platform.python_version())
    sources = expand_inputs([str(corpus_path)])
    model_prefix = str(out_dir / TOKENIZER_PREFIX)
    if tokenizer:
        train_tokenizer(iter_texts(sources), model_prefix, vocab_size=VOCAB_SIZE, num_threads=1)
    if tokens:
        tok = load_tokenizer(f"{model_prefix}.model")
        summary = tokenize_corpus(sources, f"{out_dir}/{TOKENS_DIR}", tok,
                                  TokenizeOptions(workers=1, overwrite=True, progress=False))
        logger.info("%s", summary.format())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elas_megatron.prep.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(DEMO_DIR), help="where to write (default: %(default)s)")
    parser.add_argument("--skip-corpus", action="store_true", help="reuse the existing corpus file")
    parser.add_argument("--skip-tokenizer", action="store_true", help="reuse the existing tokenizer.model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    build_demo(args.out_dir, corpus=not args.skip_corpus, tokenizer=not args.skip_tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
