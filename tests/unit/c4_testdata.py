"""Generated C4-format test data for the data tests (a uniquely named module, importable from every test file)."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_TOKENIZER = REPO / "data" / "demo" / "tokenizer.model"

_WORDS = ("the model data token shard train valid split blend weight layer sparse rank matrix gradient loss step "
          "batch sequence document corpus text byte file line index cache worker process core memory disk read "
          "write merge resume complete partial error field value number small large fast slow every each some "
          "many few first last next other same different new old good bad clear open close start stop").split()
_EXTRAS = ("café", "naïve", "Straße", "日本語", "🙂", "1234", "3.14159", "e-mail", "C++", "x=y+1", "\t", "  ")


def generate_docs(n: int, seed: int = 0) -> list[str]:
    """C4-like documents: paragraphs of sentences, with unicode, digits, tabs and doubled spaces sprinkled in."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(_WORDS) if rng.random() > 0.08 else rng.choice(_EXTRAS)
                     for _ in range(rng.randint(5, 60))]
            paragraphs.append(" ".join(words).capitalize() + ".")
        docs.append("\n".join(paragraphs))
    return docs


def write_shard(path: Path, docs: list[str], *, extra_lines: dict[int, str] | None = None) -> Path:
    """Write ``docs`` as a C4 shard (gzip when the name ends in .gz); ``extra_lines`` inserts raw lines at
    0-based positions (to plant bad input)."""
    lines = [json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"},
                        ensure_ascii=False) for i, d in enumerate(docs)]
    for pos, raw in sorted((extra_lines or {}).items()):
        lines.insert(pos, raw)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path
