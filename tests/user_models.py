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


class Named(nn.Module):
    """Takes a keyword called ``name``: ``+model.name=...`` passes it, as any key of one's own."""

    def __init__(self, name: str = "net"):
        super().__init__()
        self.label = name
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


class Outer:
    class Inner(Named):
        """A class nested in another: ``_target_=user_models.Outer.Inner``."""
