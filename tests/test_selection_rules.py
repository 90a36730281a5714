"""Which weights the engine chooses, on hand-made weights and gradients with expectations worked out by hand.

Each case is built so that the rule the README states and a plausible wrong rule pick different weights: RigL's
|gradient| regrowth and annealed swap count, blocks by the sum of their scores, N:M keeping the largest, channels by
L2 (not L1) norm, the structured baseline's same fraction per layer, AGP's configurable power and LAMP's squares.
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from patcli.baselines import BaselineContext, parse_baseline
from patcli.config import parse_run_config
from patcli.engine import ALLOCATIONS, PATTERNS, REGROWTHS, SCHEDULES, Pruner
from patcli.hydra_app import conf_dir


def linear(weight, bias=None) -> nn.Linear:
    """A Linear layer holding exactly these weights (and bias, or none)."""
    weight = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


def prune_once(model: nn.Module, sparsity: float, **parts) -> Pruner:
    """One mask update at ``sparsity`` with the magnitude scorer, as a post-training prune makes it."""
    pruner = Pruner(model, sparsity=sparsity, schedule=SCHEDULES.get("fixed")(), total_steps=1, **parts)
    pruner.update_masks(0, sparsity)
    return pruner


# -- RigL -------------------------------------------------------------------------------------------------------------

# One 4×6 layer, flat indices 0..23: 0..11 active with |w| = 1..12, 12..23 pruned (zero).
RIGL_WEIGHT = torch.tensor([float(i + 1) for i in range(12)] + [0.0] * 12).reshape(4, 6)
RIGL_KEEP = (torch.arange(24) < 12).reshape(4, 6)
# Active 0..8 (every weight any count here, or the constant 6, could drop) get tiny gradients, so a dropped weight
# never wins its place back; active 9..11 get the largest, which must not matter (they are kept, not grown). The
# pruned positions' |g| rank, largest first: 13 (-0.9), 18 (-0.8), 15 (0.7), 20 (0.6), 23 (0.5), 19 (0.4), 16 (-0.3),
# 22 (0.25), 12, 21, 14, 17.
RIGL_GRAD = torch.tensor([0.01] * 9 + [5.0] * 3
                         + [0.2, -0.9, 0.1, 0.7, -0.3, 0.05, -0.8, 0.4, 0.6, -0.15, 0.25, 0.5]).reshape(4, 6)
BY_GRADIENT = [13, 18, 15, 20, 23]


def rigl_update(t: int):
    rigl = REGROWTHS.get("rigl")(delta_t=25, end=100, drop_fraction=0.5, init="random").bind(200)
    keeps, regrown = rigl.update(t, [RIGL_WEIGHT.clone()], [RIGL_GRAD.clone()], [RIGL_KEEP.clone()])
    return keeps[0].reshape(-1), regrown[0].reshape(-1)


# drop_fraction_t = 0.5/2 · (1 + cos(π·t/100)), and n = round(drop_fraction_t · 12 active):
#   t=25: 0.25·(1 + 0.70711) = 0.42678 → 5.12 → 5;  t=50: 0.25·(1 + 0) → 3.0 → 3;
#   t=75: 0.25·(1 − 0.70711) = 0.07322 → 0.88 → 1;  t=100 (end) and t=150 (after it): 0 → 0.
# The constant drop_fraction would swap round(0.5 · 12) = 6 at every one of them.
@pytest.mark.parametrize("t, swapped", [(25, 5), (50, 3), (75, 1), (100, 0), (150, 0)])
def test_rigl_swaps_the_cosine_annealed_count_and_regrows_the_largest_gradients(t, swapped):
    """RigL drops the n smallest active weights and regrows the n pruned positions of largest |g|; n anneals to 0."""
    keep, regrown = rigl_update(t)
    dropped = set(range(swapped))  # the n smallest active magnitudes: |w| = 1..n at indices 0..n-1
    expected = (set(range(12)) - dropped) | set(BY_GRADIENT[:swapped])
    assert set(torch.nonzero(keep).flatten().tolist()) == expected
    assert set(torch.nonzero(regrown).flatten().tolist()) == set(BY_GRADIENT[:swapped])
    assert int((RIGL_KEEP.reshape(-1) & ~keep).sum()) == swapped  # dropped, none of them grown back
    assert int(keep.sum()) == 12  # as many grown as dropped


# -- block pattern ----------------------------------------------------------------------------------------------------

def test_block_pattern_prunes_the_block_of_the_smallest_sum_not_of_the_smallest_element():
    """A 1×4 block is scored by the sum of its |w| (its L1 norm): one tiny weight does not doom a strong block."""
    weight = [[-5.0, 5.0, 5.0, 0.1, 1.0, -1.0, 1.0, 1.0],
              [2.0, 2.0, -2.0, 2.0, 3.0, 0.5, -3.0, 3.0]]
    # blocks (row, columns): A = (0, 0-3) sum 15.1 min 0.1; B = (0, 4-7) sum 4 min 1;
    #                        C = (1, 0-3) sum 8 min 2;      D = (1, 4-7) sum 9.5 min 0.5.
    # By sum the lowest is B (then C); by minimum it would be A (then D).
    model = nn.Sequential(linear(weight))
    keep = prune_once(model, 0.25, pattern=PATTERNS.get("block")()).masks.keep[0]
    assert keep.tolist() == [[True] * 4 + [False] * 4, [True] * 8]  # B pruned: 4 of 16 weights = 0.25
    keep = prune_once(nn.Sequential(linear(weight)), 0.5, pattern=PATTERNS.get("block")()).masks.keep[0]
    assert keep.tolist() == [[True] * 4 + [False] * 4, [False] * 4 + [True] * 4]  # B and C pruned


# -- N:M --------------------------------------------------------------------------------------------------------------

def test_nm_keeps_the_two_largest_magnitudes_of_every_four():
    """2:4 drops the two smallest |w| of each group of four consecutive inputs, whatever their signs and places."""
    weight = [[4.0, -1.0, 3.0, 2.0, -5.0, 8.0, 7.0, -6.0],
              [-9.0, 12.0, 10.0, -11.0, 0.5, -16.0, 13.0, 15.0]]
    # groups: |4 1 3 2| keeps 4, 3 · |5 8 7 6| keeps 8, 7 · |9 12 10 11| keeps 12, 11 · |0.5 16 13 15| keeps 16, 15
    expected = [[True, False, True, False, False, True, True, False],
                [False, True, False, True, False, True, False, True]]
    model = nn.Sequential(linear(weight))
    keep = prune_once(model, 0.5, pattern=PATTERNS.get("nm")()).masks.keep[0]
    assert keep.tolist() == expected
    magnitude = torch.tensor(weight).abs().reshape(-1, 4)
    groups = keep.reshape(-1, 4)
    for values, kept in zip(magnitude, groups):
        assert int(kept.sum()) == 2 and float(values[kept].min()) >= float(values[~kept].max())



def test_nm_on_a_conv_groups_input_channels_at_each_kernel_position():
    """A conv's 2:4 groups are four input channels at one (filter, kernel position), as sparse conv kernels take them
    (TensorRT, Ascend AMCT): not four neighbours along the flattened in·kh·kw row, which cross channel boundaries."""
    conv = nn.Conv2d(4, 1, kernel_size=(1, 2), bias=False)
    # input channel c, kernel column j: |w| = 10·(c+1) + j
    values = torch.tensor([[[[10.0, 11.0]], [[20.0, 21.0]], [[30.0, 31.0]], [[40.0, 41.0]]]])
    with torch.no_grad():
        conv.weight.copy_(values)
    keep = prune_once(nn.Sequential(conv), 0.5, pattern=PATTERNS.get("nm")()).masks.keep[0]
    # each column keeps channels 2 and 3. Grouping the flattened row (10, 11, 20, 21 | 30, 31, 40, 41) would keep
    # channel 1 and channel 3 at both columns instead: the same count, other weights.
    assert keep[0, :, 0, 0].tolist() == [False, False, True, True]
    assert keep[0, :, 0, 1].tolist() == [False, False, True, True]
    per_position = keep.movedim(1, -1).reshape(-1, 4).sum(1)
    assert per_position.tolist() == [2, 2]

# -- channels ---------------------------------------------------------------------------------------------------------

def neuron_pair() -> nn.Sequential:
    # neuron 0: row [3, 0, 0, 0], neuron 1: row [1, 1, 1, 1]; each also owns one next-layer input weight of 1.
    # L2 over its slices: neuron 0 √(9 + 1) = 3.16, neuron 1 √(4 + 1) = 2.24 → neuron 1 goes.
    # L1: neuron 0 3 + 1 = 4, neuron 1 4 + 1 = 5 → neuron 0 would go.
    return nn.Sequential(linear([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), nn.ReLU(), linear([[1.0, 1.0]]))


def test_neurons_are_scored_by_l2_norm_by_default_so_a_spread_row_goes_before_a_peaked_one():
    """reduce=l2 (the default) ranks [3,0,0,0] above [1,1,1,1] although its L1 norm is lower."""
    assert PATTERNS.get("neurons")().reduce == "l2"
    # one neuron of two: its row (4) and next-layer input (1) of 4 + 4 + 2 = 10 weights
    model = neuron_pair()
    prune_once(model, 0.5, pattern=PATTERNS.get("neurons")())
    assert model[0].weight.tolist() == [[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert model[2].weight.tolist() == [[1.0, 0.0]]
    model = neuron_pair()  # the same case tells the norms apart: l1 prunes the other neuron
    prune_once(model, 0.5, pattern=PATTERNS.get("neurons")(reduce="l1"))
    assert model[0].weight.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def baseline_config(*overrides: str, output_root: Path):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", [*overrides, f"output_root={output_root}"])
    return parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))


def test_the_structured_baseline_removes_the_same_fraction_of_neurons_in_every_layer(tmp_path):
    """baseline=structured as configured: half of each hidden layer by L2 norm, though a global threshold would take
    the first layer's weak neurons only."""
    # hidden layer 1 (8 neurons): row c = a_c·[1, 0, 0, 0], a = 5 1 7 2 8 3 6 4, and 0.1 in each of 4 next-layer
    # inputs: L2 √(a² + 0.04), lowest four at a = 1, 2, 3, 4 → neurons 1, 3, 5, 7.
    # hidden layer 2 (4 neurons): row 0.1·ones(8), next-layer column b_c·[1, 0], b = 20 10 40 30: L2 √(0.08 + b²),
    # lowest two → neurons 1, 0. Every layer-2 score (≥ 10) is above every layer-1 score (≤ 8.003).
    a = [5.0, 1.0, 7.0, 2.0, 8.0, 3.0, 6.0, 4.0]
    b = [20.0, 10.0, 40.0, 30.0]
    model = nn.Sequential(linear([[x, 0.0, 0.0, 0.0] for x in a], [0.0] * 8), nn.ReLU(),
                          linear([[0.1] * 8] * 4, [0.0] * 4), nn.ReLU(),
                          linear([b, [0.0] * 4], [0.0, 0.0]))
    # 4 of 8 and 2 of 4 neurons: weights 32 + 32 + 8 = 72; pruned 32·½ + 32·(1 − ½·½) + 8·½ = 16 + 24 + 4 = 44,
    # 44/72 = 0.611 (round(0.61 · 72) = 44). Globally, [5, 0] (40) and [6, 0] (48) are the nearest counts instead.
    config = baseline_config("baseline=structured", "pruning.sparsity=0.61", output_root=tmp_path)
    context = BaselineContext(config, None, 0, model, None, torch.device("cpu"), None, tmp_path)
    assert parse_baseline(config).run(context) == 0  # no fine-tuning
    removed = [torch.nonzero((model[i].weight == 0).all(dim=1)).flatten().tolist() for i in (0, 2)]
    assert removed == [[1, 3, 5, 7], [0, 1]]


# -- schedules --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["polynomial", "agp"])
def test_a_polynomial_schedule_follows_the_power_it_is_given(name):
    """power=2 over steps 0..800: at step 400, p = ½, so s = 0.9 + (0.1 − 0.9)·(½)² = 0.7 (power 3 would give 0.8)."""
    schedule = SCHEDULES.get(name)(power=2.0, begin=0, end=800, initial_sparsity=0.1).bind(1000, 0.9, 100)
    assert schedule.target(400) == pytest.approx(0.7)
    assert schedule.target(200) == pytest.approx(0.9 - 0.8 * 0.75**2)  # p = ¼: 0.45
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    pruner = Pruner(model, sparsity=0.9, schedule=SCHEDULES.get(name)(power=2.0, begin=0, end=800, initial_sparsity=0.1),
                    total_steps=1000, frequency=100)
    pruner.update_masks(400)
    assert sum(int((~k).sum()) for k in pruner.masks.keep) == 70  # 0.7 of 100 weights


# -- LAMP -------------------------------------------------------------------------------------------------------------

def test_lamp_counts_per_layer_follow_the_squared_scores():
    """LAMP ranks w²/Σ_{larger} w²; without the squares the same case prunes another layer."""
    # layer A: six weights of 1 → scores 1/6, 1/5, 1/4, 1/3, 1/2, 1 (squared or not: 1² = 1).
    # layer B: weights 1 and 2.5 → squared 1/(1 + 6.25) = 0.138, 1; unsquared 1/(1 + 2.5) = 0.286, 1.
    # Three of eight pruned, the lowest scores across layers:
    #   squared:   B 0.138, A 0.167, A 0.2          → A 2, B 1
    #   unsquared: A 0.167, A 0.2,   A 0.25 (< .286) → A 3, B 0
    model = nn.Sequential(linear([[1.0] * 6]), linear([[1.0], [2.5]]))
    pruner = prune_once(model, 3 / 8, allocation=ALLOCATIONS.get("lamp")())
    assert [int((~k).sum()) for k in pruner.masks.keep] == [2, 1]
    assert model[1].weight.tolist() == [[0.0], [2.5]]


@pytest.mark.parametrize("mode, reason", [
    ("unstructured", "weights outside the masks are exactly zero too (units that no longer get a gradient)"),
    ("block", "the nearest that whole blocks reach"),
    ("neurons", "the nearest that whole neurons reach"),
])
def test_a_run_off_its_target_is_told_the_reason_its_mode_has(mode, reason, tmp_path):
    """An unstructured run's masks hold the exact count: it was told "whole blocks", which it has none of."""
    from patcli.runner import off_target_reason

    assert off_target_reason(baseline_config(f"pruning={mode}", output_root=tmp_path)) == reason
