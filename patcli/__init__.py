"""patcli: pruning-aware training of PyTorch models, with post-training baselines to compare against."""

__version__ = "0.1.0"


def load_pruned(path, device=None):
    """Load an exported (physically smaller or compressed) model: ``patcli.load_pruned("outputs/runs/.../")``.

    ``device="cuda"`` also turns 2:4 layers that the export measured as faster into sparse-kernel layers.
    """
    from .export import load_pruned as load

    return load(path, device)
