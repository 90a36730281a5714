"""Models of one's own for the tests of ``model=custom`` (importable because pytest puts tests/ on the path)."""

from torch import nn


class TupleOut(nn.Module):
    """Returns (logits, extra): patcli needs the logits alone."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x), 0


class FrozenFirst(nn.Module):
    """A frozen feature layer (fine-tuning a pretrained body): never a pruning candidate."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(64, 32)
        self.features.requires_grad_(False)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


class AllFrozen(FrozenFirst):
    def __init__(self):
        super().__init__()
        self.requires_grad_(False)
