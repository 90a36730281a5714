"""Pruning reversal, SET/RigL and proximal (group-)lasso PAT: revival, constant active counts, closed forms."""

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from patcli.engine import REGROWTHS, REGULARIZERS, SCHEDULES, Pruner
from patcli.engine.layouts import ChannelGroup, ChannelLayout, Slice
from patcli.engine.regrowth import drop_fraction_at
from patcli.engine.regularizers import soft_threshold_
from patcli.engine.schedules import Schedule, ScheduleError

from conftest import result_of, run_dir_of


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def step(model, optimizer, generator):
    inputs = torch.randn(16, 16, generator=generator)
    targets = torch.randint(0, 4, (16,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


class Milestones(Schedule):
    """A schedule of one's own, unregistered (no name): the target at steps 0, 30 and 60, by a rule of its own."""

    def curve(self, p: float) -> float:
        return self.final_sparsity

    def is_update_step(self, t: int) -> bool:
        return t in (0, 30, 60)


def test_a_schedule_of_ones_own_is_counted_by_its_own_rule_and_named_by_its_class():
    """Counted by the base class's stride (one update) it was refused under reversal, whose message then crashed on
    the missing name."""
    model = tiny()
    pruner = Pruner(model, sparsity=0.5, schedule=Milestones(begin=0, end=60), total_steps=80, frequency=50,
                    regrowth=REGROWTHS.get("reversal")()).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert pruner.schedule.update_steps() == [0, 30, 60] and pruner.schedule.update_count() == 3

    class Once(Milestones):
        def is_update_step(self, t: int) -> bool:
            return t == 0

    with pytest.raises(ScheduleError, match=r"^regrowth: reversal re-chooses .* this run's schedule=Once prunes at 1 "):
        Pruner(model, sparsity=0.5, schedule=Once(begin=0, end=60), total_steps=80, regrowth=REGROWTHS.get("reversal")())


def test_reversal_brings_back_a_pruned_weight_whose_gradient_pushes_it_up():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.10, 1.0, 2.0, 3.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = Pruner(model, sparsity=0.25, schedule=SCHEDULES.get("constant")(begin=0, end=6), total_steps=10, frequency=3,
                    regrowth=REGROWTHS.get("reversal")()).attach(optimizer)
    for t in range(10):  # from step 1 on, the loss rewards weight 0 alone: its gradient is large, the others' zero
        inputs = torch.tensor([[0.0 if t == 0 else 1.0, 0.0, 0.0, 0.0]])
        optimizer.zero_grad()
        (-(model(inputs)).sum() * 2.0).backward()
        optimizer.step()
    first, later = pruner.updates[0], pruner.updates[1:]
    assert first.step == 0 and first.revived == 0  # step 0: weight 0 (|w| = 0.1) is the one pruned
    assert later[0].step == 3 and later[0].revived == 1  # it kept learning in the shadow and comes back...
    assert not bool(pruner.masks.keep[0][0, 1])  # ...in place of weight 1, now the smallest
    assert bool(pruner.masks.keep[0][0, 0])
    assert float(model[0].weight[0, 0].detach()) > 3.0 and float(model[0].weight[0, 1].detach()) == 0.0
    assert float(pruner.masking.shadow[0][0, 1]) == 1.0  # the pruned weight's last value is kept


@pytest.mark.parametrize("scorer", ["magnitude", "gradient", "movement", "hessian"])
def test_reversal_revives_weights_with_every_scorer(scorer):
    """Gradient-based scores of a pruned weight use its dense (shadow) value: at its masked value, 0, |w·g| could
    never bring it back."""
    from patcli.engine import SCORERS

    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("linear")(begin=0, end=40), total_steps=60, frequency=5,
                    scorer=SCORERS.get(scorer)(), regrowth=REGROWTHS.get("reversal")()).attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        step(model, optimizer, generator)
    assert sum(u.revived for u in pruner.updates) > 0
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_dynamic_sparse_training_keeps_the_exact_active_count_per_layer_at_every_step(name):
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    regrowth = REGROWTHS.get(name)(delta_t=3, end=24, init="erk")
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("constant")(), total_steps=30, regrowth=regrowth).attach(optimizer)
    counts = [int(k.sum()) for k in pruner.masks.keep]
    # ERK densities differ per layer, but the rounded per-layer counts add up to the exact total
    assert sum(w.numel() for w in pruner.masks.weights) - sum(counts) == round(0.8 * sum(w.numel() for w in pruner.masks.weights))
    generator = torch.Generator().manual_seed(0)
    changed = False
    for _ in range(30):
        before = [k.clone() for k in pruner.masks.keep]
        step(model, optimizer, generator)
        assert [int(k.sum()) for k in pruner.masks.keep] == counts
        assert all(bool((w[~k] == 0).all()) for w, k in zip(pruner.masks.weights, pruner.masks.keep))
        changed |= any(not torch.equal(a, b) for a, b in zip(before, pruner.masks.keep))
    assert changed and [u.step for u in pruner.updates] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert all(u.revived > 0 for u in pruner.updates[:-1])


def test_regrown_weights_start_at_zero_with_fresh_optimizer_state():
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, sparsity=0.7, schedule=SCHEDULES.get("constant")(), total_steps=10,
                    regrowth=REGROWTHS.get("rigl")(delta_t=5, end=9, init="random")).attach(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        step(model, optimizer, generator)
    before = [k.clone() for k in pruner.masks.keep]
    step(model, optimizer, generator)  # t=4
    step(model, optimizer, generator)  # t=5, after which the update runs
    grown = [(~b) & k for b, k in zip(before, pruner.masks.keep)]
    assert sum(int(g.sum()) for g in grown) > 0
    for weight, positions in zip(pruner.masks.weights, grown):
        assert bool((weight[positions] == 0).all())
        state = optimizer.state[weight]
        assert bool((state["exp_avg"][positions] == 0).all()) and bool((state["exp_avg_sq"][positions] == 0).all())


def test_drop_fraction_follows_the_cosine_closed_form():
    for t in (0, 25, 50, 75, 100, 150):
        assert drop_fraction_at(t, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi * min(t, 100) / 100)))
    assert drop_fraction_at(0, 100, 0.3) == pytest.approx(0.3) and drop_fraction_at(100, 100, 0.3) == pytest.approx(0.0)


def test_soft_threshold_matches_its_closed_form():
    weight = torch.tensor([-1.0, -0.05, 0.0, 0.02, 0.5, 2.0])
    soft_threshold_(weight, 0.1)
    torch.testing.assert_close(weight, torch.tensor([-0.9, 0.0, 0.0, 0.0, 0.4, 1.9]))


def three_channel_layer() -> tuple[nn.Linear, ChannelLayout]:
    """Rows [3, 4], [0.1, 0], [0, 1] with a zero bias, read by a next layer through a zero column: one group of three
    channels, each of 2 + 1 + 1 weights."""
    layer = nn.Linear(2, 3)
    nxt = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.1, 0.0], [0.0, 1.0]]))
        layer.bias.zero_()
        nxt.weight.zero_()
    params = {"a.weight": layer.weight, "a.bias": layer.bias, "b.weight": nxt.weight}
    group = ChannelGroup("a", 3, [Slice("a.weight", 0), Slice("a.bias", 0), Slice("b.weight", 1)], layer.weight.shape)
    return layer, ChannelLayout(params, [group])


def test_group_lasso_step_matches_the_group_shrinkage_closed_form():
    layer, layout = three_channel_layer()
    regularizer = REGULARIZERS.get("group_lasso")(lam=1.0, warmup=0).bind(10)
    regularizer.apply(layout, lr=lambda weight: 0.5, t=0)
    size = 2 + 1 + 1  # weight row, bias, next layer's input column
    threshold = 0.5 * 1.0 * math.sqrt(size)
    expected = [max(0.0, 1 - threshold / n) for n in (5.0, 0.1, 1.0)]
    torch.testing.assert_close(layer.weight[:, 0], torch.tensor([3.0, 0.1, 0.0]) * torch.tensor(expected))
    assert float(layer.weight[1].detach().abs().sum()) == 0.0 and float(layer.weight[2].detach().abs().sum()) == 0.0


def test_lasso_pat_masks_what_it_zeroes_and_can_close_at_an_exact_target():
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, sparsity=0.6, schedule=SCHEDULES.get("agp")(begin=0, end=20), total_steps=30, frequency=5,
                    regularizer=REGULARIZERS.get("lasso")(lam=0.05, warmup=0, target=0.6)).attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    sparsities = []
    for _ in range(30):
        step(model, optimizer, generator)
        sparsities.append(pruner.sparsity())
    assert 0 < sparsities[4] < 0.6  # the penalty alone zeroes weights before the closing mask
    assert pruner.updates[-1].step == 20 and pruner.updates[-1].target == 0.6
    assert pruner.sparsity() == pytest.approx(0.6, abs=2e-3)  # exact (up to rounding) after closing at the end


@pytest.mark.parametrize("allocation", ["global", "uniform", "erk", "lamp"])
def test_a_lasso_close_is_exact_under_every_allocation_however_many_zeros_the_penalty_made(allocation):
    """Weights the penalty zeroed once counted as pruned before the close (scores of -inf): per-layer allocations then
    could not prune fewer, and a 0.3 target closed at 0.79."""
    from patcli.engine import ALLOCATIONS

    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, sparsity=0.3, schedule=SCHEDULES.get("agp")(begin=0, end=20), total_steps=30, frequency=5,
                    allocation=ALLOCATIONS.get(allocation)(),
                    regularizer=REGULARIZERS.get("lasso")(lam=0.1, warmup=0, target=0.3)).attach(optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        step(model, optimizer, generator)
    assert pruner.sparsity() > 0.6  # the penalty zeroed far more than the target before the close
    closing_update = pruner.update_masks
    before = []
    pruner.update_masks = lambda *args, **kwargs: (before.extend(w.detach().clone() for w in pruner.masks.weights),
                                                    closing_update(*args, **kwargs))[1]
    step(model, optimizer, generator)  # step 20: the close
    closing = pruner.updates[-1]
    assert closing.step == 20 and pruner.masks.sparsity() == pytest.approx(0.3, abs=1 / pruner.masks.accounted_numel())
    for weight, keep in zip(before, pruner.masks.keep):  # within each layer, the largest weights are kept
        if bool(keep.any()) and not bool(keep.all()):
            assert float(weight.abs()[~keep].max()) <= float(weight.abs()[keep].min())
    # per layer, what the allocation gives for the magnitudes as they were (zeros once scored below every weight,
    # which distorted LAMP's per-layer normalisation: one zero moved hundreds of prunes between layers)
    budget = pruner._budget([w.abs().reshape(-1) for w in before], 0.3)
    assert [int((~k).sum()) for k in pruner.masks.keep] == ALLOCATIONS.get(allocation)().prune_counts(budget)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["regrowth=rigl", "schedule=alternating"], "allowed with schedule=constant (got schedule=alternating)"),
        (["regrowth=set", "pruning=neurons"], "allowed with pruning=unstructured"),
        (["regrowth=reversal", "schedule=alternating"], "both lift masks"),
        (["regularizer=group_lasso"], "allowed with pruning=neurons, filters or heads"),
        (["regularizer=lasso", "regrowth=reversal"], "allowed with regrowth=none"),
        (["regrowth=rigl", "regrowth.drop_fraction=1.5"], "regrowth.drop_fraction: 1.5 is out of range"),
        (["regrowth=rigl", "schedule=constant", "pruning.masking=dense_shadow"],
         "pruning.masking: regrowth=rigl regrows weights at zero, which a dense copy would overwrite; allowed with pruning.masking=inplace"),
        # parts a run would carry unused, under a recipe name that never ran
        (["regrowth=rigl", "scorer=movement"], "scorer: regrowth=rigl drops the smallest weights by magnitude; allowed "
                                               "with scorer=magnitude (got scorer=movement)"),
        (["regrowth=set", "allocation=lamp"], "allocation: regrowth=set spreads the sparsity over layers by regrowth.init"),
        (["regularizer=lasso", "scorer=hessian"], "scorer: regularizer=lasso zeroes weights by its penalty and closes by "
                                                  "magnitude; allowed with scorer=magnitude (got scorer=hessian)"),
        (["regularizer=lasso", "regularizer.lam=nan"], "regularizer.lam: nan is out of range; allowed: a finite number > 0"),
        (["regularizer=lasso", "regularizer.lam=inf"], "regularizer.lam: inf is out of range"),
        (["regrowth=rigl", "regrowth.seed=-1"], "regrowth.seed: -1 is out of range; allowed: 0 <= seed < 2**63"),
        (["regrowth=rigl", "regrowth.seed=99999999999999999999"], "regrowth.seed: 99999999999999999999 is out of range"),
        (["schedule=alternating", "schedule.final=0"], "schedule.final: 0 is out of range"),
    ],
)
def test_invalid_combinations_are_one_line_errors(cli, tmp_path, overrides, message):
    code, out, err = cli("train", "trainer.epochs=1", *overrides)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("outputs/**/result.json"))  # refused before any run began


def test_the_engine_in_python_refuses_a_wrong_type_naming_the_argument_as_the_cli_does():
    """Built in Python, RigL(delta_t=2.5) ran and drop_fraction="0.3" died comparing a string with a number."""
    for build, message in [
        (lambda: REGROWTHS.get("rigl")(delta_t=2.5), "regrowth 'rigl': delta_t must be an int, got 2.5"),
        (lambda: REGROWTHS.get("rigl")(delta_t=True), "regrowth 'rigl': delta_t must be an int, got True"),
        (lambda: REGROWTHS.get("set")(drop_fraction="0.3"), "regrowth 'set': drop_fraction must be a number, got '0.3'"),
        (lambda: REGULARIZERS.get("lasso")(lam="x"), "regularizer 'lasso': lam must be a number, got 'x'"),
        (lambda: REGULARIZERS.get("lasso")(target="0.5"), "regularizer 'lasso': target must be a number or None, got '0.5'"),
        (lambda: SCHEDULES.get("agp")(end="half"), "schedule 'agp': end must be an int or a number, got 'half'"),
    ]:
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            build()
    assert REGROWTHS.get("rigl")(delta_t=5, drop_fraction=1 / 2).delta_t == 5  # right types pass, ints as numbers too
    assert REGULARIZERS.get("lasso")(lam=1, target=None).lam == 1
    from patcli.engine import ALLOCATIONS  # numpy values pass as the Python values they stand for
    assert ALLOCATIONS.get("sensitivity")(trials=np.array([0.5, 0.9]), refresh=np.bool_(False), batches=np.int64(2)).batches == 2
    assert REGROWTHS.get("set")(delta_t=np.int32(3), drop_fraction=np.float32(0.25)).delta_t == 3
    from dataclasses import dataclass

    from patcli.engine.registry import Registry

    @dataclass
    class Mine:  # a hint only a type checker resolves (imported under TYPE_CHECKING) is left unchecked, not an error
        model: "NotImportedHere" = None  # noqa: F821

    assert Registry("thing").register("mine")(Mine)(model=1).model == 1


def test_a_penalty_that_overshoots_its_target_or_the_layer_cap_is_said_in_the_run_log(cli):
    """lam=20 zeroed 99.1% of the first layer and 39.7% overall for a target of 30%, with no word; the mask-update
    rows showed the masks' 30% while every weight was zero."""
    code, out, err = cli("train", "regularizer=lasso", "regularizer.lam=20", "regularizer.target=0.3", "trainer.epochs=4")
    assert code == 0, err
    run = run_dir_of(out)
    record, log = result_of(run), (run / "run.log").read_text()
    assert record["achieved_sparsity"] > 0.305 and record["per_layer_sparsity"]["1.weight"] > 0.99
    assert (f"regularizer=lasso zeroed {record['achieved_sparsity']:.4g} of the prunable weights, more than "
            "regularizer.target=0.3: lower regularizer.lam (20)") in log
    assert "regularizer=lasso zeroed 1.weight beyond pruning.max_layer_sparsity=0.99" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    closing = [r for r in rows if r["kind"] == "mask_update"][-1]
    assert closing["target"] == 0.3 and closing["sparsity"] > 0.9  # the weights' zeros at that step, not the masks' 0.3


def test_masks_chosen_afresh_under_lamp_follow_the_magnitudes_even_with_a_weight_at_zero():
    """Zeros were once given a score below every other weight for a fresh choice; LAMP then shifted that layer's
    scores and compared numbers that no longer meant the same: one zero moved hundreds of prunes between layers."""
    from patcli.engine import ALLOCATIONS

    model = tiny()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10,
                    allocation=ALLOCATIONS.get("lamp")())
    expected = ALLOCATIONS.get("lamp")().prune_counts(pruner._budget([w.detach().abs().reshape(-1) for w in pruner.masks.weights], 0.5))
    pruner.update_masks(0, 0.5, monotone=False)
    assert [int((~k).sum()) for k in pruner.masks.keep] == expected
