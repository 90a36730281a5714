"""Engine rules pinned by hand-computed cases: allocation rounding and caps, schedule edges, optimizer-state resets,
prunable-weight selection, proximal steps and surgery. Every expected value is worked out in the comments."""

import pytest
import torch
from torch import nn

from patcli.engine.allocation import ALLOCATIONS, LayerBudget, erk_sparsities
from patcli.engine.schedules import SCHEDULES
from test_allocation import budget




def scores_of(*sizes):
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(n, generator=generator) for n in sizes]


# -- allocation ------------------------------------------------------------------------------------------------------


def test_erk_holds_a_layer_that_would_pass_the_cap_at_the_cap_and_gives_the_rest_to_the_other_layers():
    """ERK raw densities (Σ dims / Π dims): 200/10000 = 0.02, 20/100 = 0.2, 30/200 = 0.15. At 88% of 10300 weights,
    keep 1236: ε = 1236 / (0.02·10000 + 0.2·100 + 0.15·200) = 4.944 puts the big layer at density 0.0989, under
    1 - cap = 0.1. It is held at 0.1 (1000 kept); the other two share 236 with ε' = 236 / (100 + 0.75·200) = 0.944
    relative to the densest raw (0.2): densities 0.944 and 0.708."""
    shapes = [torch.Size([100, 100]), torch.Size([10, 10]), torch.Size([10, 20])]
    assert erk_sparsities(shapes, 0.88, 0.9) == pytest.approx([0.9, 0.056, 0.292])


def test_uniform_rounds_each_layer_to_its_nearest_count():
    """0.875 of 40 is 35 and of 10 is 8.75, rounded to 9: 44 = round(0.875 · 50 = 43.75), already exact, so no layer
    absorbs a gap. Truncating 8.75 to 8 would leave a gap of one that the big layer takes: [36, 8]."""
    counts = ALLOCATIONS.get("uniform")().prune_counts(budget(scores_of(40, 10), 0.875))
    assert counts == [35, 9]


def test_the_largest_layer_absorbs_the_rounding_gap():
    """0.56 of 10, 10 and 100 rounds to 6, 6 and 56: 68, one over round(0.56 · 120 = 67.2) = 67. The largest layer
    gives the one back: [6, 6, 55] (a small layer absorbing it would move its sparsity by 10%, not 1%)."""
    counts = ALLOCATIONS.get("uniform")().prune_counts(budget(scores_of(10, 10, 100), 0.56))
    assert counts == [6, 6, 55]


def test_absorbing_the_rounding_gap_never_unprunes_what_is_already_pruned():
    """As above, but the largest layer already has 56 groups pruned (-inf): masks only grow, so it stays at 56 and
    the next layer in size order gives the one back: [56, 5, 6]."""
    big, first, second = scores_of(100, 10, 10)
    big[:56] = float("-inf")
    counts = ALLOCATIONS.get("uniform")().prune_counts(budget([big, first, second], 0.56))
    assert counts == [56, 5, 6]


def test_absorbing_the_rounding_gap_never_takes_a_layer_past_its_cap():
    """ERK at 87% of 100 + 4 + 14 weights (budget round(102.66) = 103), cap 0.9. Raw densities 0.2, 1 and 9/14;
    keep 15.34, ε = 15.34 / 33 = 0.465 puts the big layer at 0.093 < 0.1: held at the cap, 90 pruned. The rest
    share 5.34: ε' = 5.34 / 13 = 0.4108, sparsities 0.589 and 0.736, counts round(2.36) = 2 and round(10.30) = 10:
    102. The gap of one goes past the capped big layer to the next largest: [90, 2, 11], not [91, 2, 10]."""
    shapes = [torch.Size([10, 10]), torch.Size([2, 2]), torch.Size([2, 7])]
    counts = ALLOCATIONS.get("erk")().prune_counts(budget(scores_of(100, 4, 14), 0.87, cap=0.9, shapes=shapes))
    assert counts == [90, 2, 11]


def sensitivity_budget(losses, target):
    """Two layers of 100 single weights, cap 0.75; ``losses[layer]`` are the loss increases at 0.25, 0.5 and 0.75."""
    points = (0.25, 0.5, 0.75)

    def loss_with_layer_pruned(layer, sparsity):
        return 0.0 if sparsity == 0 else losses[layer][points.index(round(sparsity, 6))]

    made = budget(scores_of(100, 100), target, cap=0.75)
    made.loss_with_layer_pruned = loss_with_layer_pruned
    return made


def test_sensitivity_fills_the_budget_along_each_layers_lower_convex_hull():
    """Layer 0 costs 0.1, 1.1, 1.1 at 25/50/75%: its hull from (0, 0) runs to (0.25, 0.1) (slope 0.4), then straight
    to (0.75, 1.1) (slope 2), past the steep middle step (slope 4). Layer 1 costs slope 3 throughout. 100 of 200
    weights: layer 0 to 75% along its hull first (75 weights), then layer 1 the last 25. Read point to point, the
    flat last step of layer 0 (slope 0) would come first and the path would end at [25, 75]."""
    sensitivity = ALLOCATIONS.get("sensitivity")(trials=[0.25, 0.5])
    counts = sensitivity.prune_counts(sensitivity_budget([[0.1, 1.1, 1.1], [0.75, 1.5, 2.25]], 0.5))
    assert counts == [75, 25]


def test_sensitivity_makes_a_noisy_loss_curve_monotone_before_taking_its_hull():
    """Layer 0 costs 1.0, 0.5, 1.5 at 25/50/75%: the dip at 50% is noise, read as 1.0 (a higher sparsity cannot
    cost less), so its hull is one segment of slope 1.5 / 0.75 = 2. Layer 1 costs slope 1.5: it goes first and takes
    all 75 weights of the budget (37.5% of 200). Trusting the dip (slope 1 to 50%) would give [50, 25]."""
    sensitivity = ALLOCATIONS.get("sensitivity")(trials=[0.25, 0.5])
    counts = sensitivity.prune_counts(sensitivity_budget([[1.0, 0.5, 1.5], [0.375, 0.75, 1.125]], 0.375))
    assert counts == [0, 75]


def test_uniform_over_channels_takes_the_nearest_count_per_layer_at_each_fraction():
    """Channels of 10 and 3 elements (4 and 10 of them; 70 in all) whose pruned elements are searched, not added
    up: budget round(0.2 · 70) = 14. At a common fraction f each layer rounds f · groups to the nearest count, so
    the path passes [1, 1] (13 elements, for 0.125 < f < 0.15) before [1, 2] (16): [1, 1] is nearest. Floored
    counts would jump from [0, 2] (6) to [1, 2] (16), two off."""
    made = LayerBudget(group_scores=scores_of(4, 10), group_sizes=[10, 3],
                       shapes=[torch.Size([4, 10]), torch.Size([10, 3])], target=0.2, max_layer_sparsity=0.99,
                       total=70, pruned_elements=lambda c: 10 * c[0] + 3 * c[1])
    assert ALLOCATIONS.get("uniform")().prune_counts(made) == [1, 1]


def test_global_blocks_take_the_whole_number_of_blocks_nearest_the_budget():
    """Blocks of 4 weights, 8 blocks (32 weights), target 7/32: a budget of 7 weights is nearer 2 blocks (8) than
    1 (4), so the two lowest blocks go (0.1 in layer 0 and 0.2 in layer 1)."""
    scores = [torch.tensor([0.1, 0.5, 0.6, 0.7]), torch.tensor([0.8, 0.2, 0.9, 0.4])]
    counts = ALLOCATIONS.get("global")().prune_counts(budget(scores, 7 / 32, sizes=[4, 4]))
    assert counts == [1, 1]


# -- thresholds ------------------------------------------------------------------------------------------------------


def test_kth_smallest_reads_the_upper_ranks_exactly_on_small_inputs():
    """Sorted, [-inf, -inf, 1, 2, 2, 2, 3, 5]: the 3rd smallest is 1, the 6th 2, the 7th 3, the 8th 5 (the upper
    ranks are read from the largest values: n - k + 1 of them)."""
    from patcli.engine.threshold import kth_smallest

    values = torch.tensor([2.0, 5.0, float("-inf"), 2.0, 1.0, 3.0, float("-inf"), 2.0])
    assert [float(kth_smallest(values, k)) for k in range(1, 9)] == [float("-inf")] * 2 + [1.0, 2.0, 2.0, 2.0, 3.0, 5.0]
    assert float(kth_smallest([values[:3], values[3:]], 7)) == 3.0


def test_groups_of_unequal_size_stop_where_the_pruned_elements_are_nearest_the_budget():
    """Groups by score: 0.1 (layer 0, 4 weights), 0.2 and 0.3 (layer 1, 2 each), 0.5 (layer 0, 4): running totals
    4, 6, 8, 12. A budget of 11 is nearer 12 than 8: all four go. A budget of 7 lies as near 6 as 8: the fewer,
    [1, 1]."""
    from patcli.engine.threshold import lowest_counts

    scores = [torch.tensor([0.1, 0.5]), torch.tensor([0.2, 0.3])]
    assert lowest_counts(scores, [4, 2], 11) == ([2, 2], None)
    assert lowest_counts(scores, [4, 2], 7) == ([1, 1], None)


def test_groups_of_unequal_size_with_equal_scores_go_in_layer_order():
    """Every score ties: ties go by layer order, so a budget of 4 takes layer 0's first group of 4, not layer 1's
    two groups of 2."""
    from patcli.engine.threshold import lowest_counts

    scores = [torch.ones(2), torch.ones(2)]
    assert lowest_counts(scores, [4, 2], 4) == ([1, 0], None)


def test_ties_at_the_cut_are_pruned_in_index_order():
    """Scores 1, 2, 2, 2, 3 and two to prune: the 1, then the first of the three tied 2s (index 1)."""
    from patcli.engine.threshold import keep_all_but_lowest

    keep = keep_all_but_lowest(torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0]), 2)
    assert keep.tolist() == [False, False, True, True, True]


def test_a_global_update_over_weights_that_all_tie_prunes_exactly_the_budget_in_layer_then_index_order():
    """Two 4×4 layers of equal weights, 25% of 32: exactly 8 go, all from layer 0 (ties split by layer order) and
    there its first 8 entries (rows 0 and 1, index order)."""
    from patcli.engine import Pruner

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(0.5)
    pruner = Pruner(model, sparsity=0.25, schedule=SCHEDULES.get("fixed")(), total_steps=1,
                    allocation=ALLOCATIONS.get("global")())
    pruner.update_masks(0, 0.25)
    assert (model[0].weight == 0).tolist() == [[True] * 4] * 2 + [[False] * 4] * 2
    assert int((model[1].weight == 0).sum()) == 0


def test_sensitivity_with_nothing_to_prune_keeps_what_is_already_pruned():
    """A target of 0 needs no measurement, but masks only grow: layer 0's two groups already pruned (-inf) stay
    counted."""
    scores = scores_of(4, 4)
    scores[0][:2] = float("-inf")
    assert ALLOCATIONS.get("sensitivity")().prune_counts(budget(scores, 0.0)) == [2, 0]


# -- schedules -------------------------------------------------------------------------------------------------------


def bound(name, total=1000, sparsity=0.9, frequency=100, **params):
    return SCHEDULES.get(name)(**params).bind(total, sparsity, frequency)


def test_begin_and_end_are_steps_as_ints_and_fractions_of_the_run_as_floats():
    """Of 10 steps: begin=1 is step 1 (an int is a step, even 1), end=1.0 the whole run clamped to its last step 9,
    0.5 is step 5; with frequency 3 the updates are 1, 4, 7 and the end 9."""
    schedule = bound("linear", total=10, frequency=3, begin=1, end=1.0)
    assert (schedule.begin_step, schedule.end_step) == (1, 9)
    assert schedule.update_steps() == [1, 4, 7, 9]
    assert bound("linear", total=10, begin=0.5, end=9).begin_step == 5


def test_the_target_is_zero_before_begin_even_with_an_initial_sparsity():
    """The module says so: the initial sparsity is where the ramp starts at ``begin``, not a target before it."""
    schedule = bound("agp", begin=100, end=900, initial_sparsity=0.2)
    assert schedule.target(99) == 0.0 and schedule.target(100) == pytest.approx(0.2)


def test_a_schedule_that_begins_and_ends_at_one_step_goes_straight_to_the_final_target():
    """begin = end: progress is complete at that step (1, not 0), so the linear ramp's target is s_f = 0.9, not s_i."""
    schedule = bound("linear", begin=50, end=50, initial_sparsity=0.2)
    assert schedule.update_steps() == [50]
    assert schedule.target(50) == 0.9 and schedule.target(70) == 0.9


def test_an_alternating_final_phase_shorter_than_a_step_still_gets_one_step():
    """final = 0.01 of 20 steps rounds to 0 steps; the schedule must still end compressed, so the final phase is the
    last step (19), where masks reach the final target."""
    schedule = bound("alternating", total=20, begin=0, compressed=2, decompressed=2, final=0.01, ramp="linear")
    assert schedule.end_step == 19
    assert schedule.phase(19) == "compressed" and schedule.is_update_step(19)
    assert schedule.target(19) == 0.9


def test_masks_set_before_a_gradual_schedule_begins_are_held_during_the_wait():
    """Only phase-based schedules lift masks: masks chosen by hand before an AGP ramp that begins at step 5 keep
    their weights at zero through steps 0-3 of SGD, though no scheduled update has run yet."""
    from patcli.engine import Pruner

    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("agp")(begin=5, end=8), total_steps=10, frequency=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    pruner.update_masks(0, target=0.5)
    pruned = ~pruner.masks.keep[0]
    assert int(pruned.sum()) == 32
    for _ in range(4):
        model(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert float(model.weight.detach()[pruned].abs().sum()) == 0.0


# -- regularizers ----------------------------------------------------------------------------------------------------


def test_lasso_soft_thresholds_by_lr_times_a_strength_that_ramps_up_over_the_warm_up_then_holds():
    """lam = 1, warm-up 4 steps, lr 0.1, zero gradients: step t subtracts 0.1 · min(1, (t + 1)/4) from |w|, i.e.
    0.025, 0.05, 0.075, 0.1, then 0.1 each step. 0.5 becomes 0.475, 0.425, 0.35, 0.25, 0.15; -0.3 becomes -0.275,
    -0.225, -0.15, -0.05, 0; 0.02 is 0 after the first step."""
    from patcli.engine import Pruner
    from patcli.engine.regularizers import REGULARIZERS

    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.3, 0.02]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("constant")(begin=0, end=9), total_steps=10, frequency=100,
           regularizer=REGULARIZERS.get("lasso")(lam=1.0, warmup=4)).attach(optimizer)
    seen = []
    for _ in range(5):
        model.weight.grad = torch.zeros_like(model.weight)
        optimizer.step()
        seen.append(model.weight.detach()[0].tolist())
    expected = [[0.475, -0.275, 0.0], [0.425, -0.225, 0.0], [0.35, -0.15, 0.0], [0.25, -0.05, 0.0], [0.15, 0.0, 0.0]]
    assert seen == [pytest.approx(row, abs=1e-6) for row in expected]


def test_the_penalty_acts_through_the_schedules_end_step_and_then_stops():
    """lam = 1, no warm-up, lr 0.1, zero gradients, schedule end at step 3: steps 0-3 each take 0.1 off |w| (1.0 →
    0.6) and steps 4-5 take nothing."""
    from patcli.engine import Pruner
    from patcli.engine.regularizers import REGULARIZERS

    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("constant")(begin=0, end=3), total_steps=10, frequency=100,
           regularizer=REGULARIZERS.get("lasso")(lam=1.0, warmup=0)).attach(optimizer)
    for _ in range(6):
        model.weight.grad = torch.zeros_like(model.weight)
        optimizer.step()
    assert model.weight.detach()[0].tolist() == pytest.approx([0.6, -1.6])


def test_group_lasso_takes_the_step_size_from_the_weight_that_produces_the_channels():
    """Rows [3, 4], [0.1, 0], [0, 1] of a layer trained at lr 0.5 (the next layer, at lr 0.1, reads them through a
    zero column): groups of 2 + 1 + 1 = 4 weights, threshold 0.5 · 1 · √4 = 1, factors (1 - 1/5) = 0.8, 0 and
    (1 - 1/1) = 0. The next layer's lr would give threshold 0.2 and factors 0.96, 0, 0.8."""
    from patcli.engine.regularizers import REGULARIZERS
    from test_dynamic import three_channel_layer

    layer, layout = three_channel_layer()
    regularizer = REGULARIZERS.get("group_lasso")(lam=1.0, warmup=0).bind(10)
    regularizer.apply(layout, lr=lambda weight: 0.5 if weight is layer.weight else 0.1, t=0)
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]))



# -- sensitivity trials ----------------------------------------------------------------------------------------------


def sensitivity_pruner(model, evaluate):
    from patcli.engine import Pruner

    return Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("oneshot")(), total_steps=1,
                  allocation=ALLOCATIONS.get("sensitivity")(), evaluate=evaluate)


def test_sensitivity_trials_leave_batchnorm_statistics_and_training_mode_as_they_were():
    """An evaluate written as a plain loss (no eval()) ran each trial in train mode: 25 trials moved a BatchNorm's
    running variance by up to 59%. Trials now run in eval mode, and the model's modes come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    inputs = torch.randn(32, 8) * 3 + 1
    seen_training = []

    def loss():
        seen_training.append(model.training)
        return float(model(inputs).square().mean().detach())

    pruner = sensitivity_pruner(model, loss)
    model[3].eval()  # a mix of modes, restored module by module
    before = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    pruner.update_masks(0)
    assert len(seen_training) > 5 and not any(seen_training)
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])
    assert int(model[1].num_batches_tracked) == before[2]
    assert [m.training for m in model] == [True, True, True, False]


@pytest.mark.parametrize("returned, error, message", [
    (float("nan"), FloatingPointError, "evaluate returned nan at step 0: allocation=sensitivity needs a finite"),
    (float("inf"), FloatingPointError, "evaluate returned inf at step 0"),
    (None, TypeError, "evaluate must return one number, the validation loss; it returned NoneType"),
    (torch.ones(2), TypeError, "evaluate must return one number, the validation loss; it returned Tensor"),
])
def test_sensitivity_refuses_an_evaluate_that_returns_no_finite_number(returned, error, message):
    """A NaN loss gave every layer a NaN curve and an arbitrary split ([0.988, 0.806, 0.0]); None a bare float() error."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(error, match=message.replace("(", r"\(")):
        sensitivity_pruner(model, lambda: returned).update_masks(0)


# -- prunable weights ------------------------------------------------------------------------------------------------


def test_a_weight_shared_by_two_modules_is_listed_once_under_its_first_name():
    """fc2 reuses fc1's weight: one entry, named as the model first registers it (fc1.weight), never fc2.weight."""
    from patcli.engine.masks import select_prunable

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.fc2.weight = self.fc1.weight

    assert list(select_prunable(Shared())) == ["fc1.weight", "out.weight"]


def test_a_module_registered_twice_can_be_excluded_by_its_second_name():
    """One Linear at positions 0 and 2 of a Sequential: its weight is 0.weight and 2.weight, and excluding either
    name leaves it dense."""
    from patcli.engine.masks import select_prunable

    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer, nn.Linear(4, 2))
    assert list(select_prunable(model)) == ["0.weight", "3.weight"]
    assert list(select_prunable(model, exclude=["2.weight"])) == ["3.weight"]



@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "torch_prune"])
def test_a_weight_a_parametrization_computes_stays_dense_with_a_warning_and_needs_no_exclude(parametrize, caplog):
    """weight_norm, spectral_norm and torch.nn.utils.prune recompute ``module.weight`` at each forward: masking it
    masks nothing that lasts. It was taken as prunable, then refused by attach() (not in the optimizer), and the
    exclude that error suggested matched no parameter."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils import prune as torch_prune

    from patcli.engine import Pruner

    torch.manual_seed(0)
    first = nn.Linear(8, 16)
    if parametrize == "torch_prune":
        torch_prune.l1_unstructured(first, "weight", amount=0.25)
    else:
        first = getattr(parametrizations, parametrize)(first)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    with caplog.at_level("WARNING"):
        pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2).attach(optimizer)
    assert pruner.masks.names == ["2.weight", "4.weight"]
    assert "0.weight left dense: computed by a parametrization" in caplog.text
    # building the pruner computed no weight: spectral_norm's power-iteration vector _u did not move
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in state.items())
    caplog.clear()
    with caplog.at_level("WARNING"):  # excluding it by the name the warning gives is accepted, and silences it
        Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2, exclude=["0.weight"])
    assert "left dense" not in caplog.text
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
    assert pruner.sparsity() == 0.5


def test_no_prunable_weight_says_what_is_prunable_when_include_names_a_frozen_layer():
    from patcli.engine import Pruner

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^no prunable weights: check include and exclude \(pruning.include and pruning.exclude on "
                                         r"the command line\); only Linear and Conv weights that train are prunable: not frozen ones"):
        Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2, include=["0.weight"])

# -- surgery ---------------------------------------------------------------------------------------------------------


def test_surgery_cuts_only_channels_with_every_slice_zero():
    """Neuron 0 is zero everywhere (row, bias, next layer's column): cut. Neuron 1 has a zero row but a bias of 0.5
    that reaches the next layer through ReLU: kept. Neuron 2 has zeros in its row and column but not all: kept. The
    shrunk model has 2 neurons and the same outputs."""
    from patcli.engine.structure import channel_groups
    from patcli.engine.surgery import live_channels, shrink

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        model[2].weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 3.0]]))
    groups = channel_groups(model, "neurons")
    keep = live_channels(model, groups)
    assert [k.tolist() for k in keep] == [[False, True, True]]
    small = shrink(model, groups, keep)
    assert small[0].out_features == 2 and small[2].in_features == 2
    inputs = torch.randn(5, 3)
    torch.testing.assert_close(small(inputs), model(inputs))


def test_surgery_cuts_a_filters_batchnorm_statistics_and_keeps_frozen_norms_frozen():
    """Filter 2 is zero in its conv row, bias, BatchNorm γ/β and the next conv's input: cut, and with it entry 2 of
    the running statistics ([0.1, 0.2, 0.3, 0.4] → [0.1, 0.2, 0.4], [1, 2, 3, 4] → [1, 2, 4]). The norm was frozen
    for fine-tuning: its cut γ/β stay frozen."""
    from patcli.engine.structure import channel_groups
    from patcli.engine.surgery import live_channels, shrink

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    model[1].requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        model[1].running_var.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        for tensor in (model[0].weight, model[0].bias, model[1].weight, model[1].bias):
            tensor[2] = 0.0
        model[3].weight[:, 2] = 0.0
    groups = channel_groups(model, "filters")
    small = shrink(model, groups, live_channels(model, groups))
    norm = small[1]
    assert norm.running_mean.tolist() == pytest.approx([0.1, 0.2, 0.4])
    assert norm.running_var.tolist() == pytest.approx([1.0, 2.0, 4.0])
    assert norm.num_features == 3 and small[0].out_channels == 3 and small[3].in_channels == 3
    assert not norm.weight.requires_grad and not norm.bias.requires_grad and small[0].weight.requires_grad
    inputs = torch.randn(2, 1, 7, 7)
    torch.testing.assert_close(small(inputs), model(inputs))


def test_surgery_leaves_a_grouped_conv_it_does_not_cut_as_it_was():
    """A depthwise-style conv (2 groups, 2 inputs, weight [4, 1, 1, 1]) ahead of the cut layers: its in_channels
    is groups × the weight's inputs per group = 2, not the weight's 1."""
    from patcli.engine.layouts import ChannelGroup, Slice
    from patcli.engine.surgery import shrink

    model = nn.Sequential(nn.Conv2d(2, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    slices = [Slice("2.weight", 0), Slice("2.bias", 0), Slice("4.weight", 1)]
    group = ChannelGroup("2", 3, slices, model[2].weight.shape)
    small = shrink(model, [group], [torch.tensor([True, False, True])])
    assert small[0].in_channels == 2 and small[0].groups == 2
    assert small[2].out_features == 2 and small[4].in_features == 2


# -- optimizer state -------------------------------------------------------------------------------------------------


def test_resetting_optimizer_state_zeroes_every_per_weight_moment_and_leaves_other_state_alone():
    """Adam with amsgrad keeps exp_avg, exp_avg_sq and max_exp_avg_sq per weight: all three are zeroed at the given
    positions, nowhere else, and the step count is untouched. Adafactor's row and column factors are not per weight
    (shapes [3, 1] and [1, 4]): they are left as they are."""
    from patcli.engine.masks import zero_optimizer_state_

    torch.manual_seed(0)
    where = torch.zeros(3, 4, dtype=torch.bool)
    where[0, 1] = where[2, 3] = True
    adam_moments = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    cases = [(lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True), adam_moments, ["step"]),
             (lambda p: torch.optim.Adafactor(p, lr=0.01), [], ["step", "row_var", "col_var"])]
    for make, per_weight, other in cases:
        weight = nn.Parameter(torch.randn(3, 4))
        optimizer = make([weight])
        weight.grad = torch.randn(3, 4)
        optimizer.step()
        before = {k: v.clone() for k, v in optimizer.state[weight].items()}
        zero_optimizer_state_(optimizer, [weight], [where])
        state = optimizer.state[weight]
        for key in per_weight:
            assert bool((state[key][where] == 0).all()) and torch.equal(state[key][~where], before[key][~where])
            assert bool((before[key][where] != 0).all())
        for key in other:
            assert torch.equal(state[key], before[key])


# -- defaults ---------------------------------------------------------------------------------------------------------


def engine_default(cls, key):
    """The default a part (a dataclass) or Pruner's constructor gives ``key`` when it is not passed."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(cls):
        field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
        if field is None:
            return inspect.Parameter.empty
        return field.default_factory() if field.default is dataclasses.MISSING else field.default
    return inspect.signature(cls).parameters.get(key, inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY)).default


def yaml_options():
    """(file, engine class, key, value, its default) for every setting of the engine groups' YAML files that a class takes."""
    from omegaconf import OmegaConf

    from patcli.engine import Pruner
    from patcli.engine.patterns import PATTERNS
    from patcli.engine.regrowth import REGROWTHS
    from patcli.engine.regularizers import REGULARIZERS
    from patcli.engine.scorers import SCORERS
    from patcli.hydra_app import conf_dir

    groups = {"scorer": SCORERS, "schedule": SCHEDULES, "allocation": ALLOCATIONS, "pruning": PATTERNS,
              "regrowth": REGROWTHS, "regularizer": REGULARIZERS}
    for group, registry in groups.items():
        for path in sorted((conf_dir() / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path))
            node = node.get(group, node)  # regrowth files are @package _global_
            name = node.get("mode" if group == "pruning" else "name")
            if name is None or name not in registry.names():
                continue  # none.yaml
            classes = (registry.get(name), Pruner) if group == "pruning" else (registry.get(name),)
            for key, value in node.items():
                if key not in ("name", "mode", "sparsity"):  # sparsity: a required argument, no default
                    for cls in classes:
                        yield f"{group}/{path.name}", cls, key, value, engine_default(cls, key)


def test_the_engine_takes_the_same_defaults_as_the_cli():
    """A part built by name in Python (prune_during_training(regrowth="rigl")) behaves as the CLI's option does."""
    import inspect

    compared, differ = 0, []
    for where, cls, key, value, default in yaml_options():
        if default is inspect.Parameter.empty or str(value).startswith("${"):  # ${seed}: the run's, given in Python
            continue
        compared += 1
        default = list(default) if isinstance(default, tuple) else default
        if default != value:
            differ.append(f"{where} {key}: YAML {value!r}, {cls.__name__} {default!r}")
    assert compared > 40  # every group's settings were read
    assert differ == []


def test_random_scores_are_independent_of_the_runs_init_and_of_the_next_seeds_draws():
    """scorer.seed defaults to the run's seed, and each draw used the generator of seed + its count: the first draw
    replayed the stream that initialised the model (a 'random' control that pruned by signed initial weight), and
    seed s + 1 drew what seed s drew next (79% of kept weights shared at 90% sparsity)."""
    from patcli.engine.scorers import SCORERS

    torch.manual_seed(3)
    init = torch.rand(200, 100)  # what a model built after torch.manual_seed(3) draws first
    (first,) = SCORERS.get("random")(seed=3).scores([init])
    assert abs(torch.corrcoef(torch.stack([first.flatten(), init.flatten()]))[0, 1]) < 0.05

    def kept(seed, draws):
        scorer = SCORERS.get("random")(seed=seed)
        for _ in range(draws):
            (scores,) = scorer.scores([init])
        return scores > scores.quantile(0.9)

    shared = (kept(3, 2) & kept(4, 1)).sum() / kept(3, 2).sum()  # seed 4's first draw against seed 3's second
    assert shared < 0.2  # independent draws share about 10%
