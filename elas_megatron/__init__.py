"""elas-megatron: pretraining LLaMA-style models with ELAS (low-rank, 2:4 activation-sparse) FFNs on Megatron-Core."""
__version__ = "0.1.0"

from elas_megatron.compat.upstream_warnings import install as _install_upstream_warning_filters

_install_upstream_warning_filters()  # megatron-core's import-time notices, dropped at their source
