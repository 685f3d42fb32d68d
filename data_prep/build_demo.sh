#!/usr/bin/env bash
# Rebuild the shipped demo data under data/demo/ (corpus, tokenizer, tokenized dataset) with the same pipeline
# that prepares C4. Needs no network. The corpus text depends on the CPython version (see data/demo/README.md);
# pass --skip-corpus to keep the shipped corpus and redo only the tokenizer and the tokens.
#   bash data_prep/build_demo.sh [--skip-corpus] [--skip-tokenizer]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m elas_megatron.prep.demo "$@"
