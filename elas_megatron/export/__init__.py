# SPDX-License-Identifier: Apache-2.0
"""Checkpoint export: any-layout checkpoint -> one-process model; Hugging Face LLaMA and standalone formats.

``checkpoint.py`` loads a training checkpoint into a TP=1/PP=1 model, ``hf.py`` maps it to LLaMA names and writes
the ``hf`` (dense) or ``torch`` (every variant) format, ``modeling_elas.py`` is the standalone inference module
copied into ``torch`` exports. Entry point: ``elas-export`` (:mod:`elas_megatron.cli.export`).
"""
