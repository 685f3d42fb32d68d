"""Compute kernels of the ELAS FFN core: the plain-PyTorch reference and (on CUDA) fused GPU paths."""
