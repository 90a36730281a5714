"""Schedules equal their closed forms and change masks at exactly the documented steps."""

import itertools

import pytest
import torch

from patcli.engine.schedules import SCHEDULES, ScheduleError


def bound(name, total=1000, sparsity=0.9, frequency=100, **params):
    return SCHEDULES.get(name)(**params).bind(total, sparsity, frequency)


def test_agp_matches_tfmot_polynomial_decay_at_sample_steps():
    # TF-MOT PolynomialDecay(initial_sparsity=0.2, final_sparsity=0.9, begin_step=100, end_step=900, power=3):
    # s(t) = (s_i - s_f) * (1 - p)^3 + s_f with p = (t - begin) / (end - begin), clipped to [0, 1].
    schedule = bound("agp", begin=100, end=900, initial_sparsity=0.2, power=3.0)
    expected = {100: 0.2, 300: 0.6046875, 500: 0.8125, 700: 0.8890625, 900: 0.9, 950: 0.9}
    for step, value in expected.items():
        assert schedule.target(step) == pytest.approx(value, abs=1e-12)


def test_linear_cubic_and_exponential_closed_forms():
    linear = bound("linear", begin=0, end=800, initial_sparsity=0.1)
    cubic = bound("cubic", begin=0, end=800, initial_sparsity=0.1)
    exponential = bound("exponential", begin=0, end=800, initial_sparsity=0.1)
    for step in (0, 200, 400, 600, 800):
        p = step / 800
        assert linear.target(step) == pytest.approx(0.1 + 0.8 * p)
        assert cubic.target(step) == pytest.approx(0.1 + 0.8 * p**3)
        assert 1 - exponential.target(step) == pytest.approx(0.9 * (0.1 / 0.9) ** p)


def test_cubic_starts_slowly_and_agp_starts_fast():
    cubic, agp = bound("cubic", end=800), bound("agp", end=800)
    assert cubic.target(200) < 0.02 and agp.target(200) > 0.5


def test_final_target_is_applied_at_end_when_frequency_does_not_divide_the_span():
    schedule = bound("agp", begin=10, end=107, frequency=25)
    assert schedule.update_steps() == [10, 35, 60, 85, 107]
    assert schedule.target(107) == 0.9
    assert not schedule.is_update_step(108) and not schedule.is_update_step(9)


def test_fractions_resolve_against_the_run_and_oneshot_updates_once():
    schedule = bound("agp", total=800, begin=0.1, end=0.75)
    assert (schedule.begin_step, schedule.end_step) == (80, 600)
    oneshot = bound("oneshot", total=800, begin=40)
    assert oneshot.update_steps() == [40] and oneshot.target(40) == 0.9


def test_constant_keeps_the_final_target_at_every_update():
    schedule = bound("constant", begin=0, end=300)
    assert [schedule.target(t) for t in schedule.update_steps()] == [0.9] * 4


@pytest.mark.parametrize(
    "params, key",
    [({"end": 1000}, "schedule.end"), ({"end": -3}, "schedule.end"), ({"begin": 500, "end": 100}, "schedule.end"),
     ({"initial_sparsity": 0.95}, "schedule.initial_sparsity")],
)
def test_schedules_that_cannot_run_are_rejected_with_their_key(params, key):
    with pytest.raises(ScheduleError) as error:
        bound("agp", total=1000, **params)
    assert error.value.key == key


def test_a_decompressed_phase_reports_the_zeros_the_model_holds_not_the_lifted_masks():
    from torch import nn

    from patcli.engine import Pruner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))
    schedule = SCHEDULES.get("alternating")(begin=0, compressed=2, decompressed=2, final=2, ramp="constant")
    pruner = Pruner(model, sparsity=0.8, schedule=schedule, total_steps=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    seen = []
    for _ in range(4):
        model(torch.randn(8, 20)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(pruner.current_sparsity())
    assert seen[:2] == [pytest.approx(0.8, abs=1e-3)] * 2  # compressed: the update's figure, no count
    assert seen[3] == pruner.sparsity() < 0.1  # decompressed: the weights trained again


@pytest.mark.parametrize("name, params", [
    ("agp", {"begin": 10, "end": 0.75}), ("oneshot", {"begin": 40}), ("constant", {"begin": 0, "end": 300}),
    ("exponential", {"begin": 5, "end": 500, "initial_sparsity": 0.1}),
    ("alternating", {"begin": 100, "compressed": 60, "decompressed": 0.05, "final": 250}),
])
def test_numpy_numbers_bind_as_python_ones(name, params):
    """A step count from numpy (epochs * np.ceil(n / batch)) binds like an int."""
    import numpy as np

    python = bound(name, total=1000, **params)
    numpy = SCHEDULES.get(name)(**{k: np.int64(v) if isinstance(v, int) else np.float32(v) for k, v in params.items()})
    numpy.bind(np.int64(1000), np.float64(0.9), np.int64(100))
    assert numpy.update_steps() == python.update_steps()
    assert [numpy.target(t) for t in range(1000)] == pytest.approx([python.target(t) for t in range(1000)])


def test_alternating_phase_lengths_in_steps_are_lengths_not_steps_of_the_run():
    whole = bound("alternating", total=20, frequency=1, begin=2, compressed=20, decompressed=2, final=5)
    as_fraction = bound("alternating", total=20, frequency=1, begin=2, compressed=1.0, decompressed=2, final=5)
    assert whole.compressed_steps == as_fraction.compressed_steps == 20  # one compressed phase to the final one
    assert [whole.phase(t) for t in range(20)] == ["dense"] * 2 + ["compressed"] * 18
    with pytest.raises(ScheduleError, match=r"^schedule.compressed: 21 steps is out of range; allowed: 1 to the run's 20 steps"):
        bound("alternating", total=20, frequency=1, begin=2, compressed=21, decompressed=2, final=5)
    with pytest.raises(ScheduleError, match=r"^schedule.final: the final phase \(20 steps\) starts at step 0, not after the warm-up"):
        bound("alternating", total=20, frequency=1, begin=2, compressed=4, decompressed=2, final=20)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_update_steps_listed_and_counted_equal_the_walk_over_every_step(name):
    """They were found by walking every step: trainer.epochs=10**20 never got past the config check."""
    cls, checked = SCHEDULES.get(name), 0
    for total, frequency, begin, end, phase in itertools.product([1, 7, 101], [1, 3, 60], [0, 0.1, 5], [0.3, 1.0, 40],
                                                                 [1, 0.05, 4]):
        settings = {"oneshot": {}, "fixed": {}, "alternating": {"compressed": phase, "decompressed": phase}}.get(name, {"end": end})
        try:
            schedule = cls(**settings, **({} if name == "fixed" else {"begin": begin})).bind(total, 0.9, frequency)
        except ScheduleError:  # a phase or ramp that does not fit the run
            continue
        walk = [t for t in range(schedule.begin_step, schedule.end_step + 1) if schedule.is_update_step(t)]
        assert schedule.update_steps() == walk and schedule.update_count() == len(walk), (total, frequency, begin, end, phase)
        checked += 1
    assert checked >= 30
