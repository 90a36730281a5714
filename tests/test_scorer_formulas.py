"""The scorers' documented formulas, pinned with hand-computed numbers on hand-made weights and gradients.

Two steps with gradients of opposite signs tell a mean of squares from a square of means, and a mean of absolute
values from the absolute value of a mean; every expected number is a short sum worked out below, never a call to
the code under test.
"""

import math

import numpy
import pytest
import torch
from torch import nn

from patcli.engine import PATTERNS, SCHEDULES, SCORERS, Pruner
from patcli.models.gpt import GPT
from conftest import classify_steps

W1, G1 = [2.0, -1.0, 0.5], [1.0, 2.0, -4.0]  # w·g = [2, -2, -2]
W2, G2 = [1.0, -3.0, 0.5], [-3.0, 2.0, 2.0]  # w·g = [-3, -6, 1]


def one_row(values):
    return torch.tensor([values])


def pruner_for(model, scorer, **options):
    """A pruner that only scores: masks change when a test calls update_masks."""
    return Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("fixed")(), total_steps=1,
                  scorer=SCORERS.get(scorer)(), **options)


def set_step(parameter, weight, grad):
    """The weight a step's forward used, and the gradient backward left in ``.grad``."""
    with torch.no_grad():
        parameter.copy_(one_row(weight) if isinstance(weight, list) else weight)
    parameter.grad = one_row(grad) if isinstance(grad, list) else grad.clone()


def element_scores(pruner):
    return pruner.group_scores(monotone=False)[0].tolist()


def two_steps(scorer, update_between=False):
    """Scores of a 1×3 weight after step 1 (W1, G1) and step 2 (W2, G2), optionally with a mask update between."""
    model = nn.Linear(3, 1, bias=False)
    pruner = pruner_for(model, scorer)
    set_step(model.weight, W1, G1)
    pruner.observe()
    if update_between:
        pruner.update_masks(0, target=0.0)
    set_step(model.weight, W2, G2)
    pruner.observe()
    return element_scores(pruner)


def test_hessian_is_half_the_mean_squared_gradient_times_the_current_weight_squared():
    """F = mean(g²) = [(1+9)/2, (4+4)/2, (16+4)/2] = [5, 4, 10]; ½·F·w² at W2 = ½·[5·1, 4·9, 10·¼].
    A Fisher from the mean gradient, ḡ² = [1, 4, 1], would give [0.5, 18, 0.125]."""
    assert two_steps("hessian") == [2.5, 18.0, 1.25]


def test_gradient_averages_each_steps_absolute_product_of_weight_and_gradient():
    """mean_t |w_t·g_t| = [(2+3)/2, (2+6)/2, (2+1)/2]; |mean(w·g)| would be [0.5, 4, 0.5], |ḡ·W2| [1, 6, 0.5]."""
    assert two_steps("gradient") == [2.5, 4.0, 1.5]


def test_movement_sums_minus_weight_times_gradient_over_the_steps():
    """−Σ w·g = −([2, −2, −2] + [−3, −6, 1]): a sum, not a mean."""
    assert two_steps("movement") == [1.0, 8.0, 1.0]


@pytest.mark.parametrize("scorer, window", [("gradient", [3.0, 6.0, 1.0]), ("hessian", [4.5, 18.0, 0.5])])
def test_gradient_and_hessian_average_only_the_steps_since_the_last_mask_update(scorer, window):
    """After the update only step 2 counts: |W2·G2| = [3, 6, 1] and ½·G2²·W2² = ½·[9·1, 4·9, 4·¼]."""
    assert two_steps(scorer, update_between=True) == window


@pytest.mark.parametrize("scorer, window", [("gradient", [2.0, 2.0, 2.0]), ("hessian", [2.0, 2.0, 2.0])])
def test_an_update_with_no_step_since_the_last_ranks_by_the_closed_window_not_by_zeros(scorer, window):
    """Step 1 only, then two updates in a row (``Pruner.finish`` right after a scheduled one): the second still sees
    step 1 (|W1·G1| = [2, 2, 2]; ½·G1²·W1² = ½·[1·4, 4·1, 16·¼]), where zeroed sums would score every weight 0
    and prune in index order."""
    model = nn.Linear(3, 1, bias=False)
    pruner = pruner_for(model, scorer)
    set_step(model.weight, W1, G1)
    pruner.observe()
    pruner.update_masks(0, target=0.0)
    assert element_scores(pruner) == window


def test_gradient_scores_at_finish_right_after_an_update_prune_the_lowest_not_the_first_weights():
    """frequency=1 stops 10 steps into a 20-step ramp: finish() must rank by the last step's |w·g|."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("agp")(end=20), scorer=SCORERS.get("gradient")(),
                    total_steps=30, frequency=1).attach(optimizer)
    last = []

    def record_scores():  # what each step's observe sees: the last one is the window finish() must rank by
        last[:] = [(w.detach() * w.grad).abs() for w in pruner.masks.weights]

    classify_steps(model, optimizer, 10, batch=8, before_step=record_scores)
    before = [k.clone() for k in pruner.masks.keep]
    pruner.finish()
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    for scores, kept_before, keep in zip(last, before, pruner.masks.keep):  # each layer to 0.8 (uniform allocation)
        newly = scores[kept_before & ~keep]
        assert newly.numel() >= 34 and float(newly.max()) <= float(scores[keep].min())


def test_taylor_channels_at_finish_right_after_an_update_rank_by_the_closed_window():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("agp")(end=20), scorer=SCORERS.get("taylor")(),
                    pattern=PATTERNS.get("neurons")(), total_steps=30, frequency=1).attach(optimizer)
    for _ in range(6):
        optimizer.zero_grad()
        model(torch.randn(8, 8)).square().mean().backward()
        optimizer.step()
    (closed,) = pruner.scorer.group_scores()  # the window the update at the last step used
    kept_before = pruner.layout.group_keep[0].clone()
    pruner.finish()  # raised "saw no training batches" when the update had zeroed the window
    keep = pruner.layout.group_keep[0]
    assert int((~keep).sum()) == 8
    assert float(closed[kept_before & ~keep].max()) <= float(closed[keep].min())

def test_movement_keeps_summing_across_mask_updates():
    """The update between the steps forgets nothing: still −(step 1 + step 2), where step 2 alone is [3, 6, −1]."""
    assert two_steps("movement", update_between=True) == [1.0, 8.0, 1.0]


def test_taylor_scores_a_channel_by_the_absolute_sum_of_its_weight_gradient_products_averaged_over_steps():
    """Neuron c owns row c of the first weight, its bias entry and column c of the next weight.

    Step 1: Σ w·g over neuron 0 = 1 − 2 + 2 − 2 = −1, over neuron 1 = 1.5 − 2 − 4 + 3 = −1.5.
    Step 2: neuron 0: −1 + 2 + 1 + 2 = 4, neuron 1: 3 − 1 − 1 + 1 = 2.
    Mean of the absolute sums: [(1+4)/2, (1.5+2)/2] = [2.5, 1.75] (|mean| would be [1.5, 0.25], Σ|w·g| [7.5, 7.25]),
    so neuron 1 goes first.
    """
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    first, last = model[0], model[2]
    pruner = pruner_for(model, "taylor", pattern=PATTERNS.get("neurons")())
    weights = {first.weight: torch.tensor([[1.0, 2.0], [3.0, -1.0]]), first.bias: torch.tensor([1.0, -2.0]),
               last.weight: torch.tensor([[2.0, 1.0]])}
    steps = [
        {first.weight: [[1.0, -1.0], [0.5, 2.0]], first.bias: [2.0, 2.0], last.weight: [[-1.0, 3.0]]},
        {first.weight: [[-1.0, 1.0], [1.0, 1.0]], first.bias: [1.0, 0.5], last.weight: [[1.0, 1.0]]},
    ]
    for grads in steps:
        for parameter, grad in grads.items():
            set_step(parameter, weights[parameter], torch.tensor(grad))
        pruner.observe()
    (scores,) = pruner.scorer.group_scores()
    assert scores.tolist() == [2.5, 1.75]
    pruner.update_masks(0, target=0.5)
    assert pruner.layout.group_keep[0].tolist() == [True, False]


def attention_model():
    """One block, two heads over T = 4 positions: head 0 has zero queries and keys (every score 0: uniform over the
    causal window); head 1 has q = k = 5·LayerNorm(one-hot position), so each query's own key leads the others by
    25·(4 + 4/3)/√4 ≈ 67 and it attends to itself alone."""
    gpt = GPT(vocab_size=3, block_size=4, n_layer=1, n_head=2, d_model=4, head_dim=4, mlp_ratio=1, dropout=0.0)
    attention = gpt.blocks[0].attn
    with torch.no_grad():
        gpt.token.weight.zero_()
        gpt.position.weight.copy_(torch.eye(4))
        for projection in (attention.q, attention.k):
            projection.weight.zero_()
            projection.weight[4:8] = 5.0 * torch.eye(4)
    return gpt


def test_attention_entropy_scores_a_uniform_head_at_minus_its_mean_entropy_and_prunes_it_before_a_one_hot_head():
    """Causal attention, uniform over query i's i + 1 keys, has entropy log(i + 1): the mean over the 4 queries is
    log(1·2·3·4)/4 = log(24)/4, not log(4). A one-hot head has entropy 0."""
    gpt = attention_model()
    pruner = pruner_for(gpt, "attention_entropy", pattern=PATTERNS.get("heads")())
    gpt.train()
    with torch.no_grad():
        gpt(torch.zeros(2, 4, dtype=torch.long))
        gpt(torch.ones(3, 4, dtype=torch.long))
    (scores,) = pruner.scorer.group_scores()
    assert scores[0].item() == pytest.approx(-math.log(24) / 4, rel=1e-5)
    assert scores[1].item() == pytest.approx(0.0, abs=1e-6)
    pruner.update_masks(0, target=0.5)
    assert pruner.layout.group_keep[0].tolist() == [False, True]


SYNCING_METHODS = ("item", "cpu", "tolist", "numpy", "__array__", "__float__", "__int__", "__bool__", "__index__",
                   "__len__", "__repr__", "__format__", "nonzero", "argwhere", "masked_select", "unique")
SYNCING_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique")


@pytest.fixture
def host_syncs(monkeypatch):
    """Records each call that makes a tensor's values known to the host (or, on a GPU, would wait for them): reading a
    value, converting to numpy, a data-dependent shape, a boolean mask as index, a copy to the CPU."""
    calls, watching = [], [False]

    def spy(owner, name, is_sync=lambda *a, **k: True):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if watching[0] and is_sync(*args, **kwargs):
                calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def by_mask(self, index, *value):
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts)

    def to_cpu(self, *args, **kwargs):
        targets = (*args, kwargs.get("device"))
        return any(str(a).startswith("cpu") for a in targets if isinstance(a, (str, torch.device)))

    for name in SYNCING_METHODS:
        spy(torch.Tensor, name)
    for name in SYNCING_FUNCTIONS:
        spy(torch, name)
    spy(torch.Tensor, "__getitem__", by_mask)
    spy(torch.Tensor, "__setitem__", by_mask)
    spy(torch.Tensor, "to", to_cpu)

    def during(action):
        calls.clear()
        watching[0] = True
        try:
            action()
        finally:
            watching[0] = False
        return list(calls)

    return during


READS = {
    "item": lambda t: t.sum().item(),
    "numpy": lambda t: t.numpy(),
    "__array__": lambda t: numpy.asarray(t),
    "__float__": lambda t: float(t[0]),
    "__bool__": lambda t: bool(t[0]),
    "__index__": lambda t: range(10)[t[0].long()],
    "__len__": lambda t: len(t),
    "nonzero": lambda t: torch.nonzero(t),
    "__getitem__": lambda t: t[t > 0],
    "to": lambda t: t.to("cpu"),
    "__format__": lambda t: f"{t}",
}


@pytest.mark.parametrize("name", READS)
def test_the_host_sync_spy_sees_each_kind_of_read_it_looks_for(name, host_syncs):
    """A spy that saw nothing would let any observe pass."""
    assert name in host_syncs(lambda: READS[name](torch.tensor([1.0, 0.0])))


GRADIENT_SCORERS = [name for name in SCORERS.names() if SCORERS.get(name).needs_grad]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("scorer", GRADIENT_SCORERS)
def test_observing_a_step_never_reads_a_tensor_on_the_host(scorer, scaled, host_syncs):
    """observe runs before every optimizer step: any read of a value there would be a host sync per step on a GPU
    (with a GradScaler's scale and overflow flag too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    grouped = getattr(SCORERS.get(scorer), "grouped", False)
    pruner = pruner_for(model, scorer, **({"pattern": PATTERNS.get("neurons")()} if grouped else {}))
    nn.functional.cross_entropy(model(torch.randn(5, 8)), torch.tensor([0, 1, 2, 3, 0])).backward()
    scale = (torch.tensor(4.0), torch.tensor(0.0)) if scaled else (None, None)
    assert host_syncs(lambda: [pruner.observe(*scale) for _ in range(3)]) == []
    state = pruner.scorer.state_dict()
    assert any(k.startswith("sum.") for k in state) and all(bool(v.isfinite().all()) for v in state.values())
    assert any(bool(v.abs().sum() > 0) for k, v in state.items() if k.startswith("sum."))
