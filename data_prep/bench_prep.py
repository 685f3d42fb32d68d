"""Measure the C4 pipeline on this machine: reader speed (plain vs Hugging Face ``datasets``) and tokenization MB/s.

Generates a C4-like shard (gzip JSON lines; text from a word-bigram model of the demo corpus, with C4-like document
and paragraph lengths and a sprinkle of names, numbers and URLs), trains a 32000-piece unigram tokenizer on a sample
of it (the T5/LLaMA vocabulary size), then times:

* reading only: our streaming reader (gzip + orjson) vs ``datasets.load_dataset("json", streaming=True)`` and the
  non-streaming ``load_dataset("json")`` (which first converts the file to an Arrow cache);
* ``tokenize_corpus`` with 1 and 2 workers ("blocks": one shard split over workers) and 2 workers over 2 shards
  ("shards": the C4 mode), for each tokenizer given.

    python data_prep/bench_prep.py --workdir /tmp/c4bench --mb 80

Prints a markdown table (the numbers in docs/data.md come from it). Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path


def _bigram_model(texts: list[str]) -> dict[str, list[str]]:
    model: dict[str, list[str]] = {}
    for text in texts:
        words = text.split()
        for a, b in zip(words, words[1:], strict=False):
            model.setdefault(a, []).append(b)
    return model


def make_c4_like_shards(out_dir: Path, total_mb: float, shards: int, seed: int = 0) -> list[Path]:
    """C4-like shards of ``total_mb`` MB of text in all (documents ~2.2 kB on average, as in C4)."""
    from elas_megatron.prep.demo import demo_documents

    rng = random.Random(seed)
    model = _bigram_model([r["text"] for r in demo_documents()])
    starts = [w for w in model if w[:1].isupper()] or list(model)
    syllables = ["ka", "lo", "mi", "ra", "den", "vor", "sel", "tan", "bri", "qu", "zen", "ol", "um", "est", "ph", "ing",
                 "ar", "ton", "wick", "ber", "ly", "ch", "ex", "ia", "ov", "sk", "ni", "ge"]
    paths, per_shard = [], total_mb * 1e6 / shards
    for s in range(shards):
        path = out_dir / f"c4-train.{s:05d}-of-{shards:05d}.json.gz"
        written = 0
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as f:
            while written < per_shard:
                paragraphs = []
                for _ in range(max(1, int(rng.expovariate(1 / 4)))):
                    word, words = rng.choice(starts), []
                    for _ in range(rng.randint(20, 120)):
                        words.append(word)
                        r = rng.random()
                        if r < 0.06:  # names, numbers, URLs: C4 is full of them
                            words.append("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))).title())
                        elif r < 0.08:
                            words.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
                        elif r < 0.085:
                            words.append(f"https://www.{rng.choice(syllables)}{rng.choice(syllables)}.com/"
                                         f"{rng.randint(1, 9999)}")
                        word = rng.choice(model.get(word) or starts)
                    paragraphs.append(" ".join(words))
                text = "\n".join(paragraphs)
                f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                    "url": f"https://example.com/{written}"}) + "\n")
                written += len(text.encode("utf-8"))
        paths.append(path)
    return paths


def _shards(directory: Path, total_mb: float, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return sorted(directory.glob("*.json.gz")) or make_c4_like_shards(directory, total_mb, count)


def time_plain_reader(paths: list[Path]) -> tuple[float, int, int]:
    from elas_megatron.prep.sources import expand_inputs, iter_blocks, parse_block

    start = time.perf_counter()
    docs = nbytes = 0
    for source in expand_inputs([str(p) for p in paths]):
        for block in iter_blocks(source):
            result = parse_block(block)
            docs += len(result.texts)
            nbytes += result.text_bytes
    return time.perf_counter() - start, docs, nbytes


def time_hf_reader(paths: list[Path], streaming: bool, cache_dir: Path) -> tuple[float, int, int]:
    import datasets

    shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh Arrow cache: its conversion is part of the cost
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=[str(p) for p in paths], split="train", streaming=streaming,
                               cache_dir=str(cache_dir))
    docs = nbytes = 0
    if streaming:
        for batch in ds.iter(batch_size=1000):
            docs += len(batch["text"])
            nbytes += sum(len(t.encode("utf-8")) for t in batch["text"])
    else:
        for batch in ds.select_columns(["text"]).iter(batch_size=1000):
            docs += len(batch["text"])
            nbytes += sum(len(t.encode("utf-8")) for t in batch["text"])
    return time.perf_counter() - start, docs, nbytes


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_tokenize(paths: list[Path], tokenizer_path: str, out: str, workers: int, mode: str) -> dict:
    from elas_megatron.prep.pipeline import TokenizeOptions, tokenize_corpus
    from elas_megatron.prep.sources import expand_inputs
    from elas_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    cpu0 = _cpu_seconds()
    summary = tokenize_corpus(expand_inputs([str(p) for p in paths]), out, tok,
                              TokenizeOptions(workers=workers, mode=mode, overwrite=True, progress=False))
    t = summary.totals
    return {"seconds": summary.seconds, "cpu_seconds": _cpu_seconds() - cpu0, "docs": t.documents,
            "tokens": t.tokens, "text_bytes": t.text_bytes,
            "mode": summary.mode, "workers": summary.workers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/c4bench")
    parser.add_argument("--mb", type=float, default=80.0, help="MB of raw text in the generated shard")
    parser.add_argument("--tokenizers", nargs="*", default=None,
                        help="sentencepiece models to time (default: a 32000-piece unigram trained here + the demo's)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    parser.add_argument("--max-workers", type=int, default=2,
                        help="also time 4, 8, ... up to this many workers on as many shards of --mb/N MB each")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    one = _shards(work / "one", args.mb, 1)
    two = _shards(work / "two", args.mb, 2)  # the same amount of text in two shards, for the "shards" mode
    size_mb = sum(p.stat().st_size for p in one) / 1e6
    print(f"shard: {one[0]} ({size_mb:.1f} MB gzip)", file=sys.stderr)

    tokenizers = args.tokenizers
    if tokenizers is None:
        model = work / "sp32k-unigram.model"
        if not model.exists():
            from elas_megatron.prep.sources import expand_inputs, iter_texts
            from elas_megatron.prep.tokenizer_training import train_tokenizer

            texts = (t for i, t in enumerate(iter_texts(expand_inputs([str(one[0])]))) if i < 20000)
            train_tokenizer(texts, str(model.with_suffix("")), vocab_size=32000)
        tokenizers = [str(model), "data/demo/tokenizer.model"]

    runs = [(1, "blocks", one), (2, "blocks", one), (2, "shards", two)]
    if args.max_workers > 2:  # a bigger machine: scaling over more shards
        many = _shards(work / f"many{args.max_workers}", args.mb, args.max_workers)
        w = 4
        while w <= args.max_workers:
            runs.append((w, "shards", many[:w]))
            w *= 2
    rows = []
    best = min((time_plain_reader(one) for _ in range(args.repeat)), key=lambda r: r[0])
    rows.append(("read: plain gzip+orjson (ours)", *best))
    try:
        rows.append(("read: datasets streaming", *time_hf_reader(one, True, work / "hf_cache")))
        rows.append(("read: datasets load_dataset (Arrow cache)", *time_hf_reader(one, False, work / "hf_cache")))
    except ImportError:
        print("datasets not installed: skipping its reader", file=sys.stderr)
    print("| measurement | seconds | documents | MB of text | MB/s of text |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, secs, docs, nbytes in rows:
        print(f"| {name} | {secs:.2f} | {docs:,} | {nbytes / 1e6:.1f} | {nbytes / 1e6 / secs:.1f} |")

    print(f"\n{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}")
    print("| tokenizer | workers | mode | wall s | tokens | MB/s of text | MB/s per worker | CPU s | "
          "MB per CPU-second |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tok in tokenizers:
        for workers, mode, inputs in runs:
            r = min((time_tokenize(inputs, tok, f"{work}/out/", workers, mode) for _ in range(args.repeat)),
                    key=lambda r: r["seconds"])
            mbs = r["text_bytes"] / 1e6 / r["seconds"]
            mb = r["text_bytes"] / 1e6
            print(f"| {os.path.basename(tok)} | {workers} | {r['mode']} | {r['seconds']:.1f} | {r['tokens']:,} | "
                  f"{mbs:.2f} | {mbs / workers:.2f} | {r['cpu_seconds']:.1f} | {mb / r['cpu_seconds']:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
