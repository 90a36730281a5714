"""Models of one's own for the tests of ``model=custom`` (importable because pytest puts tests/ on the path)."""

import torch
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


class FixedWidth(nn.Module):
    """Neuron groups of its own (``channel_groups``), but a forward that reshapes by the width it was built with: a
    copy with fewer neurons cannot run, as a head count kept as an int fails with fewer heads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x)).view(-1, 4, 8)  # 32 fixed
        return self.fc2(hidden.reshape(-1, 32))

    def channel_groups(self, kind):
        from patcli.engine.layouts import ChannelGroup, Slice

        slices = [Slice("fc1.weight", 0), Slice("fc1.bias", 0), Slice("fc2.weight", 1)]
        return [ChannelGroup("fc1", 32, slices, self.fc1.weight.shape, activation="fc2", activation_dim=-1)]
