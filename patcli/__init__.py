"""patcli: pruning-aware training of PyTorch models, with post-training baselines to compare against."""

__version__ = "0.1.0"
