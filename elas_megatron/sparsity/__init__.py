"""2:4 structured activation sparsity: the pattern (``masks``) and when it is switched on (``schedule``)."""
from elas_megatron.sparsity.masks import sparse24, sparse24_mask

__all__ = ["sparse24", "sparse24_mask"]
