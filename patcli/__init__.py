"""patcli: pruning-aware training of PyTorch models, with post-training baselines to compare against."""

__version__ = "0.1.0"


def load_pruned(path):
    """Load an exported (physically smaller or compressed) model: ``patcli.load_pruned("outputs/runs/.../")``."""
    from .export import load_pruned as load

    return load(path)
