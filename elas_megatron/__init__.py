"""elas-megatron: pretraining LLaMA-style models with ELAS (low-rank, 2:4 activation-sparse) FFNs on Megatron-Core."""
__version__ = "0.1.0"
