"""``elas-prep``: turn a text corpus (C4 shards, JSON lines, saved datasets) into Megatron training data.

Subcommands (``elas-prep SUBCOMMAND --help`` for all options):

* ``tokenize --input GLOB_OR_DIR --tokenizer MODEL --output-prefix PREFIX [--workers N]``: one Megatron indexed
  dataset (``.bin``/``.idx``) per input shard, on all cores, resumable (complete shards are skipped).
* ``train-tokenizer --input GLOB_OR_DIR --model-prefix PATH --vocab-size N``: a sentencepiece model trained on a
  sample of the corpus.
* ``merge --input PREFIX_OR_GLOB --output-prefix PREFIX``: concatenate tokenized shards into one dataset.
* ``inspect PREFIX``: check a dataset and print its counts (and, with ``--tokenizer``, its first documents).

Errors end with one line naming the file (and line) and the fix, and exit code 1; bad usage exits with 2.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import random
import sys
from collections.abc import Iterator

logger = logging.getLogger("elas_megatron.prep")


def _setup_logging(verbose: bool) -> None:
    from elas_megatron.utils.logging import init_logging

    init_logging("debug" if verbose else "info")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time notices are noise here


def _config_check(args, tokenizer) -> None:
    """With --config: refuse a tokenizer the model config would not train with."""
    if not args.config:
        return
    from elas_megatron.config import load_config
    from elas_megatron.data.tokenizer import load_tokenizer

    cfg = load_config(args.config)
    where = " ".join(args.config)
    if cfg.model.vocab_size is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but model.vocab_size="
                         f"{cfg.model.vocab_size} in {where}; use the config's tokenizer or raise model.vocab_size")
    if os.path.isfile(cfg.data.tokenizer) and load_tokenizer(cfg.data.tokenizer).sha256 != tokenizer.sha256:
        raise ValueError(f"{where} trains with data.tokenizer={cfg.data.tokenizer}, a different model than "
                         f"--tokenizer {tokenizer.path}; tokenize with the config's tokenizer or change data.tokenizer")


def _cmd_tokenize(args) -> int:
    from elas_megatron.prep.pipeline import TokenizeError, TokenizeOptions, tokenize_corpus
    from elas_megatron.prep.sources import expand_inputs
    from elas_megatron.data.tokenizer import load_tokenizer

    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        if not args.config:
            raise ValueError("tokenize needs --tokenizer MODEL (or --config CONFIG.yaml to use its data.tokenizer)")
        from elas_megatron.config import load_config

        tokenizer_path = load_config(args.config).data.tokenizer
    tokenizer = load_tokenizer(tokenizer_path)
    _config_check(args, tokenizer)
    sources = expand_inputs(args.input)
    print(f"elas-prep: {len(sources)} input shard(s), tokenizer {tokenizer.path} ({tokenizer.vocab_size} pieces, "
          f"EOS {tokenizer.eos_id}) -> {args.output_prefix}", file=sys.stderr)
    options = TokenizeOptions(workers=args.workers, text_key=args.text_key, bad_lines=args.bad_lines,
                              overwrite=args.overwrite, mode=args.mode, progress=not args.no_progress)
    try:
        summary = tokenize_corpus(sources, args.output_prefix, tokenizer, options)
    except TokenizeError as err:
        print(err.summary.format())
        raise
    print(summary.format())
    return 0


def _sample_texts(args) -> Iterator[str]:
    """Up to --sample-docs documents, spread over the shards in a seeded random order."""
    from elas_megatron.prep.sources import expand_inputs, iter_blocks, parse_block

    sources = expand_inputs(args.input)
    random.Random(args.seed).shuffle(sources)
    per_shard = max(1000, -(-args.sample_docs // min(len(sources), 32)))
    taken = 0
    for source in sources:
        from_shard = 0
        for block in iter_blocks(source, text_key=args.text_key):
            texts = parse_block(block, text_key=args.text_key, bad_lines=args.bad_lines).texts
            for text in texts[: min(per_shard - from_shard, args.sample_docs - taken)]:
                yield text
                from_shard += 1
                taken += 1
            if from_shard >= per_shard or taken >= args.sample_docs:
                break
        if taken >= args.sample_docs:
            break
    logger.info("sampled %d documents for tokenizer training", taken)


def _cmd_train_tokenizer(args) -> int:
    from elas_megatron.data.tokenizer import load_tokenizer
    from elas_megatron.prep.tokenizer_training import train_tokenizer

    print(f"elas-prep: training a {args.vocab_size}-piece {args.model_type} tokenizer on up to {args.sample_docs:,} "
          "documents (sentencepiece prints nothing meanwhile; large vocabularies take minutes)", file=sys.stderr)
    path = train_tokenizer(_sample_texts(args), args.model_prefix, vocab_size=args.vocab_size,
                           model_type=args.model_type, character_coverage=args.character_coverage,
                           byte_fallback=not args.no_byte_fallback, seed=args.seed, num_threads=args.threads or None)
    tok = load_tokenizer(path)
    print(f"wrote {path}: {tok.vocab_size} pieces, unk {tok.unk_id}, bos {tok.bos_id}, eos {tok.eos_id}")
    return 0


def _expand_prefixes(patterns: list[str]) -> list[str]:
    """Prefixes from prefixes, globs over dataset files, or directories (every ``*.idx`` inside)."""
    prefixes: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(glob.glob(os.path.join(pattern, "*.idx")))
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
        else:
            matches = [pattern]
        found = []
        for match in matches:
            for suffix in (".idx", ".bin", ".meta.json"):
                if match.endswith(suffix):
                    match = match[: -len(suffix)]
                    break
            if ".partial" not in os.path.basename(match) and match not in prefixes and match not in found:
                found.append(match)
        if not found:
            raise FileNotFoundError(f"merge input {pattern} matches no dataset; pass prefixes (paths without "
                                    ".bin/.idx), a glob such as 'data/c4/tokens/shards/c4-train.*.idx' or a directory")
        prefixes.extend(found)
    return prefixes


def _cmd_merge(args) -> int:
    from elas_megatron.data.indexed import merge_datasets

    prefixes = _expand_prefixes(args.input)
    print(f"elas-prep: merging {len(prefixes)} dataset(s) into {args.output_prefix}", file=sys.stderr)
    info = merge_datasets(prefixes, args.output_prefix)
    print(f"wrote {info.prefix}: {info.documents:,} documents, {info.tokens:,} tokens, {info.bin_bytes / 1e6:,.1f} MB")
    if args.remove_inputs:
        for prefix in prefixes:
            for suffix in (".bin", ".idx", ".meta.json"):
                if os.path.exists(prefix + suffix):
                    os.unlink(prefix + suffix)
        print(f"removed the {len(prefixes)} input dataset(s)")
    return 0


def _cmd_inspect(args) -> int:
    from elas_megatron.data.indexed import check_indexed_dataset, max_token_id

    info = check_indexed_dataset(args.prefix)
    meta = info.meta or {}
    print(f"{info.prefix}: OK, {info.documents:,} documents, {info.tokens:,} tokens ({info.dtype.__name__}), "
          f"max token id {max_token_id(info)}, {info.bin_bytes / 1e6:,.1f} MB")
    if meta:
        print(f"  tokenizer {meta.get('tokenizer')} (vocab {meta.get('vocab_size')}, EOS {meta.get('eos_id')}), "
              f"source {meta.get('source', meta.get('merged_from'))}")
    if args.tokenizer and args.show > 0:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from elas_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        dataset = IndexedDataset(info.prefix)
        for i in range(min(args.show, len(dataset))):
            print(f"--- document {i} ({len(dataset[i])} tokens)\n{tok.decode(dataset[i])[:args.chars]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elas-prep", description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    tok = sub.add_parser("tokenize", help="tokenize shards into Megatron .bin/.idx files, one per shard")
    tok.add_argument("--input", nargs="+", required=True, metavar="GLOB_OR_DIR",
                     help="C4 shards / JSON-lines files (plain or .gz), globs, directories, or datasets saved with "
                          "datasets' save_to_disk")
    tok.add_argument("--tokenizer", metavar="MODEL", help="sentencepiece .model (default: data.tokenizer of --config)")
    tok.add_argument("--output-prefix", required=True, metavar="PREFIX",
                     help="outputs are PREFIX_{shard}_text_document.{bin,idx}; PREFIX ending in / is a directory: "
                          "PREFIX{shard}_text_document")
    tok.add_argument("--workers", type=int, default=0, help="processes (default: all cores; 1 = no pool)")
    tok.add_argument("--text-key", default="text", help="JSON field / column with the text (default: %(default)s)")
    tok.add_argument("--bad-lines", choices=("stop", "skip"), default="stop",
                     help="a line that is not JSON or has no text: stop with its file:line, or skip and count it "
                          "(default: %(default)s)")
    tok.add_argument("--overwrite", action="store_true", help="redo shards that are already complete")
    tok.add_argument("--mode", choices=("auto", "shards", "blocks"), default="auto",
                     help="parallelise over whole shards or over blocks of each shard (default: auto)")
    tok.add_argument("--config", nargs="+", metavar="CONFIG.yaml",
                     help="training config(s): refuse a tokenizer that does not match its model.vocab_size / "
                          "data.tokenizer")
    tok.add_argument("--no-progress", action="store_true", help="no progress display (a bar on a terminal, else a log line every tenth)")
    tok.set_defaults(func=_cmd_tokenize)

    tr = sub.add_parser("train-tokenizer", help="train a sentencepiece tokenizer on a sample of the corpus")
    tr.add_argument("--input", nargs="+", required=True, metavar="GLOB_OR_DIR", help="as for tokenize")
    tr.add_argument("--model-prefix", required=True, metavar="PATH", help="writes PATH.model and PATH.vocab")
    tr.add_argument("--vocab-size", type=int, default=32000, help="pieces incl. <unk>, <s>, </s> (default: 32000)")
    tr.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    tr.add_argument("--sample-docs", type=int, default=200_000,
                    help="documents to sample, spread over up to 32 shards in a seeded order (default: %(default)s)")
    tr.add_argument("--character-coverage", type=float, default=0.9995)
    tr.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of bytes")
    tr.add_argument("--text-key", default="text")
    tr.add_argument("--bad-lines", choices=("stop", "skip"), default="skip")
    tr.add_argument("--seed", type=int, default=1234)
    tr.add_argument("--threads", type=int, default=0, help="trainer threads (default: all cores)")
    tr.set_defaults(func=_cmd_train_tokenizer)

    mg = sub.add_parser("merge", help="concatenate tokenized datasets into one")
    mg.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_GLOB",
                    help="dataset prefixes, globs over their files, or directories")
    mg.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin/.idx/.meta.json")
    mg.add_argument("--remove-inputs", action="store_true", help="delete the inputs after a successful merge")
    mg.set_defaults(func=_cmd_merge)

    ins = sub.add_parser("inspect", help="check a tokenized dataset and print its counts")
    ins.add_argument("prefix", help="dataset prefix (path without .bin/.idx)")
    ins.add_argument("--tokenizer", help="decode the first documents with this model")
    ins.add_argument("--show", type=int, default=2, help="documents to decode (default: %(default)s)")
    ins.add_argument("--chars", type=int, default=400, help="characters shown per document")
    ins.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``elas-prep``; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from elas_megatron.config.schema import ConfigError
    from elas_megatron.prep.pipeline import TokenizeError

    try:
        return args.func(args)
    except TokenizeError as err:
        print(f"elas-prep: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ImportError, RuntimeError, ValueError) as err:
        print(f"elas-prep: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elas-prep: interrupted; complete shards are kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
