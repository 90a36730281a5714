"""Allocators meet the global budget exactly and match hand-computed cases; thresholds are exact."""

import math

import pytest
import torch

from patcli.engine.allocation import ALLOCATIONS, AllocationError, LayerBudget, erk_sparsities, lamp_scores
from patcli.engine.threshold import count, greater, kth_smallest, kth_smallest_counts, lowest_counts


def budget(scores, target, cap=0.99, shapes=None, sizes=None):
    return LayerBudget(
        group_scores=scores,
        group_sizes=sizes or [1] * len(scores),
        shapes=shapes or [torch.Size([s.numel()]) for s in scores],
        target=target,
        max_layer_sparsity=cap,
    )


def test_kth_smallest_is_exact_on_the_histogram_path_with_ties():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 1000, (600_000,), generator=generator).float() / 7.0  # many ties, > EXACT_BELOW
    for k in (1, 12_345, 300_000, 599_999, 600_000):
        assert kth_smallest(values, k) == torch.sort(values).values[k - 1]


def test_lowest_counts_splits_ties_so_the_total_is_exact():
    scores = [torch.tensor([1.0, 2.0, 2.0, 5.0]), torch.tensor([2.0, 2.0, 9.0])]
    assert lowest_counts(scores, [1, 1], 3) == ([3, 0], 2.0)
    assert lowest_counts(scores, [1, 1], 4) == ([3, 1], 2.0)
    assert sum(lowest_counts(scores, [1, 1], 5)[0]) == 5


def test_global_allocation_is_one_threshold_across_layers():
    scores = [torch.tensor([0.1, 0.5, 0.9, 0.2]), torch.tensor([0.3, 0.05, 0.8, 0.7])]
    counts = ALLOCATIONS.get("global")().prune_counts(budget(scores, 0.5))
    assert counts == [2, 2]  # 0.05, 0.1, 0.2, 0.3 are the four lowest


def test_global_allocation_holds_a_layer_at_its_cap_and_moves_the_rest_elsewhere():
    scores = [torch.zeros(100), torch.arange(1, 101).float()]  # layer 0 would be taken whole
    counts = ALLOCATIONS.get("global")().prune_counts(budget(scores, 0.6, cap=0.9))
    assert counts == [90, 30]


def test_uniform_allocation_prunes_each_layer_to_the_target():
    scores = [torch.rand(1000), torch.rand(300), torch.rand(50)]
    counts = ALLOCATIONS.get("uniform")().prune_counts(budget(scores, 0.9))
    assert counts == [900, 270, 45]


def test_unreachable_budget_is_an_error():
    with pytest.raises(AllocationError, match="max_layer_sparsity"):
        ALLOCATIONS.get("global")().prune_counts(budget([torch.rand(10), torch.rand(10)], 0.85, cap=0.8))


def test_a_target_no_cap_below_one_can_reach_says_so_instead_of_asking_for_a_higher_cap():
    """One head per layer (groups of 64 weights): a cap must stay below 1, so no layer can lose its only group. The
    error said "raise the cap", which cannot help."""
    with pytest.raises(AllocationError, match=r"^sparsity 0.5 needs 64 pruned weights but every layer keeps at least one "
                                              r"of its groups \(weights, blocks or channels: 1 in the smallest layer\), "
                                              r"so at most 0 can go whatever the cap; lower the sparsity"):
        ALLOCATIONS.get("uniform")().prune_counts(budget([torch.rand(1), torch.rand(1)], 0.5, sizes=[64, 64]))


def test_lamp_scores_match_the_hand_computed_case():
    torch.testing.assert_close(lamp_scores(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([1.0, 1 / 14, 4 / 13]))
    torch.testing.assert_close(lamp_scores(torch.tensor([2.0, 4.0])), torch.tensor([0.2, 1.0]))


def test_lamp_allocation_prunes_by_normalised_score():
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0])]
    lamp = ALLOCATIONS.get("lamp")()
    assert lamp.prune_counts(budget(scores, 2 / 5)) == [1, 1]  # 1/14 and 0.2
    assert lamp.prune_counts(budget(scores, 3 / 5)) == [2, 1]  # then 4/13


def test_erk_densities_match_the_hand_computed_case():
    shapes = [torch.Size([10, 20]), torch.Size([20, 5])]
    # raw densities (10+20)/200 = 0.15 and (20+5)/100 = 0.25; keep 150 of 300 → ε = 150/55
    eps = 150 / 55
    assert erk_sparsities(shapes, 0.5, 0.99) == pytest.approx([1 - 0.15 * eps, 1 - 0.25 * eps])
    # at 10% sparsity the second layer would pass density 1: it stays dense and the first takes the budget
    assert erk_sparsities(shapes, 0.1, 0.99) == pytest.approx([0.15, 0.0])


@pytest.mark.parametrize("name", ["uniform", "global", "lamp", "erk"])
def test_every_allocator_meets_the_element_budget_exactly(name):
    generator = torch.Generator().manual_seed(1)
    shapes = [torch.Size([64, 256]), torch.Size([256, 256]), torch.Size([256, 10])]
    scores = [torch.rand(math.prod(s), generator=generator) for s in shapes]
    counts = ALLOCATIONS.get(name)().prune_counts(budget(scores, 0.9, shapes=shapes))
    total = sum(math.prod(s) for s in shapes)
    assert sum(counts) == round(0.9 * total)
    assert all(c <= math.floor(0.99 * math.prod(s)) for c, s in zip(counts, shapes))


@pytest.mark.parametrize("name", ["uniform", "erk"])
def test_allocators_of_per_layer_sparsities_land_on_the_nearest_whole_block(name):
    """Blocks of 4 weights: ERK at 0.6 of 208 weights pruned 128 (the rounding gap of -3 truncated to no block) where
    124 lies nearest the budget of 125."""
    shapes = [torch.Size([8, 8]), torch.Size([12, 8]), torch.Size([4, 12])]
    generator = torch.Generator().manual_seed(0)
    for target in [i / 100 for i in range(5, 95)]:
        scores = [torch.rand(math.prod(s) // 4, generator=generator) for s in shapes]
        counts = ALLOCATIONS.get(name)().prune_counts(budget(scores, target, shapes=shapes, sizes=[4, 4, 4]))
        wanted = round(target * 208)
        assert abs(4 * sum(counts) - wanted) <= 2, (target, counts, wanted)


@pytest.mark.parametrize("name", ["uniform", "global", "lamp", "erk", "sensitivity"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_every_allocator_meets_the_budget_with_neurons_within_one_channel(name, target):
    """A pruned neuron also zeroes the next layer's input column, so channel counts are searched, not rounded."""
    from torch import nn

    from patcli.engine import PATTERNS, SCHEDULES, Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
    pruner = Pruner(model, sparsity=target, schedule=SCHEDULES.get("oneshot")(), total_steps=10,
                    allocation=ALLOCATIONS.get(name)(), pattern=PATTERNS.get("neurons")(), evaluate=lambda: 0.0)
    pruner.update_masks(0)
    widest_channel = 64 + 32  # a neuron of the first layer: its weight row and the next layer's input column
    assert abs(pruner.sparsity() - target) <= widest_channel / pruner.masks.accounted_numel()


def test_sensitivity_measures_the_cap_as_the_allocation_rounds_it_never_the_whole_layer():
    from torch import nn

    from patcli.engine import PATTERNS, SCHEDULES, Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    zeroed_rows = []

    def evaluate():
        zeroed_rows.append(max(int((model[i].weight.abs().sum(1) == 0).sum()) for i in (0, 2)))
        return 0.0

    pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=5,
                    allocation=ALLOCATIONS.get("sensitivity")(), pattern=PATTERNS.get("neurons")(), evaluate=evaluate)
    pruner.update_masks(0)
    assert max(zeroed_rows) == math.floor(0.99 * 16)  # 15 of 16 neurons at the 0.99 cap point


def test_sensitivity_never_counts_below_what_is_already_pruned_for_channels():
    """Masks only grow: a sensitive layer whose channels were pruned earlier keeps at least those pruned."""
    scores = [torch.rand(16, generator=torch.Generator().manual_seed(0)), torch.rand(16)]
    scores[0][:8] = float("-inf")  # 8 channels of the first layer already pruned

    def loss(layer: int, sparsity: float) -> float:
        return 100.0 * sparsity if layer == 0 else 0.01 * sparsity  # the first layer is far more sensitive

    channels = LayerBudget(group_scores=scores, group_sizes=[10, 10], shapes=[torch.Size([16, 10])] * 2, target=0.5,
                           max_layer_sparsity=0.99, pruned_elements=lambda counts: 10 * sum(counts),
                           loss_with_layer_pruned=loss)
    assert ALLOCATIONS.get("sensitivity")().prune_counts(channels) == [8, 8]


@pytest.mark.parametrize("init", ["erk", "random"])
def test_dynamic_sparse_training_beyond_the_cap_is_an_allocation_error(init):
    from torch import nn

    from patcli.engine import SCHEDULES, Pruner
    from patcli.engine.regrowth import REGROWTHS

    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    for sparsity, cap in ((0.995, 0.99), (0.9, 0.5)):
        with pytest.raises(AllocationError, match="max_layer_sparsity"):
            Pruner(model, sparsity=sparsity, schedule=SCHEDULES.get("constant")(), total_steps=50,
                   max_layer_sparsity=cap, regrowth=REGROWTHS.get("rigl")(init=init))


@pytest.mark.parametrize("size", [50, 300_000])
def test_keep_all_but_lowest_drops_exactly_n_with_ties_and_already_pruned(size):
    from patcli.engine.threshold import keep_all_but_lowest

    generator = torch.Generator().manual_seed(2)
    scores = (torch.randint(0, 20, (size,), generator=generator)).float()
    scores[: size // 10] = float("-inf")
    for n in (0, size // 20, size // 10, size // 3, size - 1, size):
        for cut in (None, torch.tensor(5.0), torch.tensor(float("-inf"))):  # a threshold hint is checked, never trusted
            keep = keep_all_but_lowest(scores, n, cut)
            assert int((~keep).sum()) == n
            if 0 < n < size:  # every dropped score is <= every kept score
                assert float(scores[~keep].max()) <= float(scores[keep].min())


@pytest.mark.parametrize("live", [3, 500, 40_000])
def test_kth_smallest_is_exact_when_most_scores_are_already_pruned(live):
    generator = torch.Generator().manual_seed(live)
    scores = [torch.full((300_000,), float("-inf")), torch.full((100_000,), float("-inf"))]
    scores[0][:live] = torch.rand(live, generator=generator)
    everything = torch.sort(torch.cat(scores)).values
    for k in (1, 400_000 - live, 400_000 - live + 1, 400_000 - (live + 1) // 2, 400_000):
        assert kth_smallest(scores, k) == everything[k - 1]


@pytest.mark.parametrize("seed", range(6))
def test_kth_smallest_counts_are_exact_per_tensor(seed):
    """Random sizes over the sampling threshold, ties, zeros and pruned (-inf) scores: value and counts match a sort."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for size in torch.randint(1_000, 90_000, (3,), generator=generator).tolist():
        part = torch.randint(0, 5_000, (size,), generator=generator).float() / 3.0
        part[torch.rand(size, generator=generator) < 0.3 * (seed % 3)] = float("-inf")
        parts.append(part)
    everything = torch.sort(torch.cat(parts)).values
    for k in torch.randint(1, everything.numel() + 1, (5,), generator=generator).tolist():
        value, below, at = kth_smallest_counts(parts, k)
        assert value == everything[k - 1]
        assert below == [int((p < value).sum()) for p in parts]
        assert at == [int((p == value).sum()) for p in parts]


def test_numpy_backed_comparisons_match_torch():
    values = torch.tensor([0.5, -1.0, float("-inf"), 2.0, 0.5, 0.0])
    assert torch.equal(greater(values, torch.tensor(0.5)), values > 0.5)
    assert greater(values, 0.5).dtype == torch.bool
    assert count(values > 0) == 3 and count(torch.tensor([True, False, True])) == 2
    half = values.to(torch.bfloat16)  # numpy has no bfloat16: torch does it
    assert torch.equal(greater(half, 0.0), values > 0.0)


def test_sensitivity_measures_on_its_first_held_out_batches(tiny_mlp):
    from patcli.data.base import Split
    from patcli.training import evaluate

    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randn(1100, 16, generator=generator), torch.randint(0, 4, (1100,), generator=generator))
    first = evaluate(tiny_mlp, split, "classification", max_batches=1)
    assert first == evaluate(tiny_mlp, Split(split.inputs[:512], split.targets[:512]), "classification")
    assert evaluate(tiny_mlp, split, "classification", max_batches=3) == evaluate(tiny_mlp, split, "classification")
    assert ALLOCATIONS.get("sensitivity")().batches == 8
    with pytest.raises(ValueError, match="batches: 0 is out of range"):
        ALLOCATIONS.get("sensitivity")(batches=0)


def test_the_runner_gives_sensitivity_the_loss_over_its_batches_only(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from patcli.config import parse_run_config
    from patcli.data import load_dataset
    from patcli.hydra_app import conf_dir
    from patcli.models import build_model
    from patcli.runner import allocation_loss
    from patcli.training import Trainer

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", ["allocation=sensitivity", "allocation.batches=1", "dataset.val_size=600"])
    config = parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))
    data = load_dataset(config.dataset)
    trainer = Trainer(build_model(config.model, data.meta), data, config.trainer, torch.device("cpu"), seed=0)
    loss = allocation_loss(config, trainer)()
    assert loss == trainer.validation_loss(1) and loss != trainer.validation_loss()  # 600 samples: two batches


@pytest.mark.parametrize("regrowth", ["none", "reversal"])
def test_sensitivity_trials_start_from_all_weights_when_masks_can_shrink(regrowth):
    """An alternating compressed phase or reversal re-chooses among every weight: each trial prunes one layer alone
    to its trial sparsity, not on top of the previous masks."""
    from torch import nn

    from patcli.engine import REGROWTHS, SCHEDULES, Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))
    inputs = torch.randn(64, 20)
    seen = []

    def evaluate():
        seen.append([round(float((layer.weight == 0).float().mean()), 3) for layer in model])
        return float(model(inputs).pow(2).mean().detach())

    # updates at steps 0 and 4 either way: alternating's compressed phases, or reversal every 4 steps at the target
    schedule = (SCHEDULES.get("alternating")(begin=0, compressed=2, decompressed=2, final=2, ramp="constant")
                if regrowth == "none" else SCHEDULES.get("constant")(begin=0, end=8))
    pruner = Pruner(model, sparsity=0.7, schedule=schedule, total_steps=10, evaluate=evaluate, frequency=4,
                    allocation=ALLOCATIONS.get("sensitivity")(trials=[0.3]), regrowth=REGROWTHS.get(regrowth)())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    pruner.attach(optimizer)
    expected = [[0.0, 0.0], [0.3, 0.0], [0.99, 0.0], [0.0, 0.3], [0.0, 0.99]]  # base, then each layer at 0.3 and the cap
    for step in range(5):
        seen.clear()
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, 4):  # the first and the second compressed phase start
            assert seen == expected, step
    assert pruner.masks.sparsity() == pytest.approx(0.7, abs=1 / 800)


def test_sensitivity_with_a_zero_cap_prunes_nothing_instead_of_dividing_by_zero():
    from torch import nn

    from patcli.engine import SCHEDULES, Pruner

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = Pruner(model, sparsity=0.0, schedule=SCHEDULES.get("oneshot")(), total_steps=5, max_layer_sparsity=0.0,
                    allocation=ALLOCATIONS.get("sensitivity")(), evaluate=lambda: 0.0)
    pruner.update_masks(0)
    assert pruner.sparsity() == 0.0


def test_sensitivity_without_refresh_measures_at_the_first_update_that_prunes():
    """A schedule's first update (target 0, untrained weights) needs no curves; measuring there once and for all
    would allocate every later update by an untrained model's sensitivities."""
    from torch import nn

    from patcli.engine import SCHEDULES, Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    measured_at = []
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("linear")(begin=0, end=10), total_steps=12, frequency=5,
                    allocation=ALLOCATIONS.get("sensitivity")(refresh=False, trials=[0.5]),
                    evaluate=lambda: measured_at.append(pruner.step) or 0.0)
    for t in (0, 5, 10):
        pruner.step = t
        pruner.update_masks(t)
    assert set(measured_at) == {5}  # the target-0 update at step 0 measured nothing; step 10 reused step 5's curves
    assert abs(pruner.sparsity() - 0.8) <= 1 / pruner.masks.accounted_numel()


def test_erk_takes_a_large_power_without_underflow_and_refuses_an_infinite_one():
    shapes = [torch.Size([256, 64]), torch.Size([256, 256]), torch.Size([10, 256])]  # every (Σ/Π)^200 underflows to 0.0
    sizes = [math.prod(s) for s in shapes]
    sparsities = erk_sparsities(shapes, 0.5, 0.99, power=200.0)
    # relative to each other the raw densities do not underflow: the smaller layers stay dense, the largest one
    # takes the whole budget
    assert sparsities[0] == sparsities[2] == 0.0
    assert sum(s * n for s, n in zip(sparsities, sizes)) == pytest.approx(0.5 * sum(sizes))
    with pytest.raises(ValueError, match=r"^power: inf is out of range; allowed: finite values >= 0"):
        ALLOCATIONS.get("erk")(power=float("inf"))


@pytest.mark.parametrize("name", ["uniform", "global", "lamp", "erk", "sensitivity"])
def test_a_channel_target_within_rounding_of_the_caps_runs_at_the_caps(name):
    """Channels overlap, so whole-channel totals come in steps: with filters capped at 30% the CNN reaches 49.85%
    at most, and a 50% target (85 weights more, a seventh of a filter) was refused as beyond the caps although an
    uncapped run rounds to such totals too. A target a whole step beyond the caps is still refused."""
    from patcli.engine import PATTERNS, SCHEDULES, Pruner
    from patcli.models.cnn import CNN

    def pruner(target):
        torch.manual_seed(0)
        model = CNN(channels=[32, 64, 64]).build({"num_classes": 10, "input_shape": [1, 8, 8]})
        return Pruner(model, sparsity=target, schedule=SCHEDULES.get("oneshot")(), total_steps=1, max_layer_sparsity=0.3,
                      allocation=ALLOCATIONS.get(name)(), pattern=PATTERNS.get("filters")(), evaluate=lambda: 0.0)

    capped = pruner(0.5)
    capped.update_masks(0)
    assert [int((~k).sum()) for k in capped.layout.group_keep] == [9, 19, 19]  # each layer at its cap, floor(0.3 · filters)
    assert capped.sparsity() == pytest.approx(28027 / 56224, abs=1e-9)
    with pytest.raises(AllocationError, match=r"^sparsity 0.51 needs 28674 pruned weights but the per-layer cap "
                                              r"max_layer_sparsity=0.3 allows at most 28027"):
        pruner(0.51)
