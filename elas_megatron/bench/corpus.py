# SPDX-License-Identifier: Apache-2.0
"""The quality runs' English corpus: the CPython 3.11 documentation, written as a C4 shard.

The quality comparison (docs/performance.md) needs more English text than the demo corpus (1.4 MB) and must be
preparable with no network beyond the package registries. The Python documentation's reStructuredText sources
(``html/_sources/**/*.rst.txt``, ~11 MB in 497 files: the tutorial, language and library reference, HOWTOs,
FAQs, "What's New") ship in Debian's ``python3.11-doc`` package under the **PSF License Version 2** (the
documentation's license; its code examples are also under the Zero-Clause BSD license), which permits copying and
redistribution with the copyright notice kept.

Each source file becomes one document; light, deterministic clean-up turns reST into readable text (role markup
``:func:`open``` -> ``open``, inline literals and link targets unwrapped, index/label/toctree directives and
section-underline lines dropped with their indented bodies; code blocks stay). Documents are written in a seeded shuffled order (as in a C4
shard, so the validation split is a random draw) as gzip JSON lines ``{"text", "timestamp", "url"}`` and then go
through the same ``elas-prep`` pipeline as C4::

    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python -m elas_megatron.bench.corpus --source /tmp/pydoc/usr/share/doc/python3.11/html/_sources \\
        --output data/pydocs/pydocs.json.gz
    elas-prep train-tokenizer --input data/pydocs/pydocs.json.gz --model-prefix data/pydocs/tokenizer \\
        --vocab-size 8192 --sample-docs 1000
    elas-prep tokenize --input data/pydocs/pydocs.json.gz --tokenizer data/pydocs/tokenizer.model \\
        --output-prefix data/pydocs/tokens/
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from pathlib import Path

__all__ = ["clean_rst", "corpus_documents", "main"]

logger = logging.getLogger(__name__)

_DROP_DIRECTIVE = re.compile(
    r"^\s*\.\.\s+(index|toctree|highlight|include|literalinclude|moduleauthor|sectionauthor|currentmodule|"
    r"testsetup|testcleanup|tabularcolumns|only|raw|csv-table|image|figure|_[^:]*)::?.*$")
_OBJECT_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:[a-z]+:)?[a-z-]+::\s*")   # ".. function:: open(...)" -> "open(...)"
_OPTION_LINE = re.compile(r"^\s+:[a-z-]+:( .*)?$")                          # directive options (":noindex:")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.])\1{3,}\s*$")                   # section over/underlines
_ROLE = re.compile(r":[a-zA-Z][\w:+-]*:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")      # :func:`~os.open <x>` -> os.open
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")                          # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]+)``")
_BLANKS = re.compile(r"\n{3,}")
MIN_DOC_CHARS = 200


def clean_rst(text: str) -> str:
    """Readable text from one reStructuredText source (see the module docstring for what changes)."""
    lines = []
    dropping = False  # inside a dropped directive's indented body (e.g. the entries of an index)
    for line in text.splitlines():
        if dropping and line[:1].isspace() and line.strip():
            continue
        dropping = bool(_DROP_DIRECTIVE.match(line))
        if dropping or _UNDERLINE.match(line) or _OPTION_LINE.match(line):
            continue
        line = _OBJECT_DIRECTIVE.sub(r"\1", line)
        line = _LINK.sub(r"\1", _ROLE.sub(r"\1", line))
        lines.append(_LITERAL.sub(r"\1", line).rstrip())
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def corpus_documents(source: Path, *, seed: int = 0) -> list[dict[str, str]]:
    """C4 records of every ``*.rst.txt`` / ``*.rst`` under ``source``, in a seeded shuffled order."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith((".rst.txt", ".rst")))
    if not files:
        raise FileNotFoundError(f"no *.rst.txt or *.rst files under {source}: point --source at the "
                                "html/_sources directory of python3.11-doc")
    docs = []
    for path in files:
        text = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= MIN_DOC_CHARS:
            rel = path.relative_to(source).as_posix().removesuffix(".txt").removesuffix(".rst")
            docs.append((rel, text))
    random.Random(seed).shuffle(docs)
    # C4's timestamps are crawl times; these are synthetic, deterministic and in C4's format.
    return [{"text": text, "timestamp": f"2019-04-{1 + i % 28:02d}T{i % 24:02d}:{i * 7 % 60:02d}:00Z",
             "url": f"python-docs://3.11/{rel}"} for i, (rel, text) in enumerate(docs)]


def main(argv: list[str] | None = None) -> int:
    from elas_megatron.prep.demo import write_corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/doc/python3.11/html/_sources"),
                        help="html/_sources of python3.11-doc (default: where apt-get install puts it)")
    parser.add_argument("--output", type=Path, default=Path("data/pydocs/pydocs.json.gz"))
    parser.add_argument("--seed", type=int, default=0, help="document order")
    args = parser.parse_args(argv)
    try:
        records = corpus_documents(args.source, seed=args.seed)
    except FileNotFoundError as exc:
        print(f"corpus: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_corpus(args.output, records)
    chars = sum(len(r["text"]) for r in records)
    print(f"corpus: {len(records)} documents, {chars / 1e6:.2f} M characters -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
