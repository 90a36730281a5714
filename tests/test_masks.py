"""Pruned weights are exactly zero in every forward pass and stay zero through optimizer steps."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from patcli.engine import Pruner, prune_during_training, select_prunable
from patcli.engine.schedules import SCHEDULES


def train_steps(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(8, 16, generator=generator)
        targets = torch.randint(0, 4, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def zeros_in_pruned(pruner):
    return all(bool((w[~k] == 0).all()) for w, k in zip(pruner.masks.weights, pruner.masks.keep))


def test_select_prunable_takes_linear_weights_and_honours_include_exclude(tiny_mlp):
    assert list(select_prunable(tiny_mlp)) == ["0.weight", "2.weight", "4.weight"]
    assert list(select_prunable(tiny_mlp, exclude=["4.*"])) == ["0.weight", "2.weight"]
    assert list(select_prunable(tiny_mlp, include=["2.*"])) == ["2.weight"]


def test_an_output_layer_tied_to_an_embedding_is_not_prunable():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

    assert list(select_prunable(TiedLM())) == ["body.weight"]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["adamw-weight-decay", "sgd-momentum"],
)
@pytest.mark.parametrize("masking", ["inplace", "dense_shadow"])
def test_pruned_weights_stay_exactly_zero_for_50_steps_after_pruning(tiny_mlp, make_optimizer, masking):
    optimizer = make_optimizer(tiny_mlp.parameters())
    pruner = prune_during_training(
        tiny_mlp, optimizer, sparsity=0.8, total_steps=60, schedule="oneshot", masking=masking
    )
    train_steps(tiny_mlp, optimizer, 10)  # builds momentum / Adam moments before and after the one-shot prune
    pruned_before = [~k.clone() for k in pruner.masks.keep]
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    train_steps(tiny_mlp, optimizer, 50, seed=1)
    for weight, pruned in zip(pruner.masks.weights, pruned_before):
        assert torch.count_nonzero(weight[pruned]) == 0
    # the optimizer state of pruned weights did move: masking, not a frozen optimizer, keeps them at zero
    moments = [optimizer.state[w] for w in pruner.masks.weights]
    assert any(float(t[p].abs().sum()) > 0 for s, p in zip(moments, pruned_before) for t in s.values() if t.shape == p.shape)


def test_every_forward_sees_zeros_at_pruned_positions_in_dense_shadow_mode(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.5)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=20, schedule="oneshot", masking="dense_shadow")
    seen = []
    tiny_mlp[0].register_forward_pre_hook(lambda m, _: seen.append(bool((m.weight[~pruner.masks.keep[0]] == 0).all())))
    train_steps(tiny_mlp, optimizer, 20)
    assert len(seen) == 20 and all(seen[1:])
    # the dense shadow kept learning at pruned positions (that is what lets reversal bring weights back)
    shadow = pruner.masking.shadow[0]
    assert float(shadow[~pruner.masks.keep[0]].abs().sum()) > 0


def test_gradual_pruning_reaches_exact_target_with_non_dividing_frequency(tiny_mlp):
    optimizer = torch.optim.AdamW(tiny_mlp.parameters(), lr=1e-3)
    schedule = SCHEDULES.get("agp")(begin=3, end=47)
    pruner = Pruner(tiny_mlp, sparsity=0.9, schedule=schedule, total_steps=60, frequency=7).attach(optimizer)
    train_steps(tiny_mlp, optimizer, 60)
    assert [u.step for u in pruner.updates] == [3, 10, 17, 24, 31, 38, 45, 47]
    total = pruner.masks.accounted_numel()
    assert sum(int((w == 0).sum()) for w in pruner.masks.weights) == round(0.9 * total)
    assert zeros_in_pruned(pruner)


def test_masks_only_grow_during_gradual_pruning(tiny_mlp):
    optimizer = torch.optim.AdamW(tiny_mlp.parameters(), lr=1e-2)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.9, total_steps=40, frequency=5)
    previous = None
    for _ in range(40):
        train_steps(tiny_mlp, optimizer, 1)
        if previous is not None:
            assert all(bool((k <= p).all()) for k, p in zip(pruner.masks.keep, previous))
        previous = [k.clone() for k in pruner.masks.keep]


def test_saved_state_dict_loads_into_a_plain_model(tiny_mlp, tmp_path):
    optimizer = torch.optim.AdamW(tiny_mlp.parameters(), lr=1e-3)
    prune_during_training(tiny_mlp, optimizer, sparsity=0.7, total_steps=10, schedule="oneshot", masking="dense_shadow")
    train_steps(tiny_mlp, optimizer, 10)
    save_file({k: v.detach().clone() for k, v in tiny_mlp.state_dict().items()}, str(tmp_path / "m.safetensors"))
    state = load_file(str(tmp_path / "m.safetensors"))
    assert not any("orig" in k or "mask" in k for k in state)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    plain.load_state_dict(state)  # strict: same keys, same shapes
    inputs = torch.randn(5, 16)
    torch.testing.assert_close(plain(inputs), tiny_mlp(inputs))


def test_engine_state_round_trips_through_state_dict(tiny_mlp):
    optimizer = torch.optim.AdamW(tiny_mlp.parameters(), lr=1e-3)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.6, total_steps=30, scorer="gradient", frequency=4)
    train_steps(tiny_mlp, optimizer, 13)
    state = pruner.state_dict()
    assert all(v.dtype == torch.bool for k, v in state.items() if k.startswith("mask."))
    fresh = Pruner(tiny_mlp, sparsity=0.6, schedule=SCHEDULES.get("agp")(), total_steps=30,
                   scorer=type(pruner.scorer)(), allocation=type(pruner.allocation)(), frequency=4)
    fresh.load_state_dict(state)
    assert fresh.step == 13
    assert all(torch.equal(a, b) for a, b in zip(fresh.masks.keep, pruner.masks.keep))
    assert all(torch.equal(a, b) for a, b in zip(fresh.scorer._sums, pruner.scorer._sums))


@pytest.mark.parametrize(
    "recipe, split",
    [
        # stopped just before a compressed phase starts: its masks come from the weights the decompressed phase trained
        (dict(schedule=("alternating", dict(begin=4, compressed=4, decompressed=4, final=8))), 12),
        (dict(regrowth=("set", dict(delta_t=4, end=30))), 9),  # SET's random regrowth positions continue
        (dict(regrowth=("rigl", dict(delta_t=4, end=30))), 9),
        (dict(scorer="hessian"), 13),  # mid-accumulation
    ],
    ids=["alternating", "set", "rigl", "hessian"],
)
def test_a_run_resumed_from_state_dicts_matches_the_uninterrupted_run_exactly(recipe, split):
    from patcli.engine.regrowth import REGROWTHS
    from patcli.engine.scorers import SCORERS

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        default = ("constant", {}) if "regrowth" in recipe else ("linear", dict(begin=0, end=20))  # regrowth: constant only
        schedule_name, schedule_params = recipe.get("schedule", default)
        regrowth_name, regrowth_params = recipe.get("regrowth", ("none", {}))
        pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get(schedule_name)(**schedule_params), total_steps=40,
                        scorer=SCORERS.get(recipe.get("scorer", "magnitude"))(), frequency=4,
                        regrowth=REGROWTHS.get(regrowth_name)(**regrowth_params))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        return model, pruner.attach(optimizer), optimizer

    def train(model, optimizer, steps):
        for t in steps:
            generator = torch.Generator().manual_seed(t)
            inputs, targets = torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()

    model, pruner, optimizer = build()
    train(model, optimizer, range(40))
    model_a, pruner_a, optimizer_a = build()
    train(model_a, optimizer_a, range(split))
    model_b, pruner_b, optimizer_b = build()
    model_b.load_state_dict(model_a.state_dict())
    optimizer_b.load_state_dict(optimizer_a.state_dict())
    pruner_b.load_state_dict(pruner_a.state_dict())
    train(model_b, optimizer_b, range(split, 40))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(pruner.masks.keep, pruner_b.masks.keep))
    assert pruner_b.updates == pruner.updates  # the history before the split came with the state
    if "schedule" in recipe:
        assert next(u for u in pruner_b.updates if u.step >= split).revived > 0  # the phase after the split brought weights back


def test_engine_state_bytes_counts_every_tensor_the_engine_holds(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot")
    train_steps(tiny_mlp, optimizer, 1)  # the update makes the score buffers
    elements = pruner.masks.accounted_numel()
    # bool keep-mask, float copy, the layout's bool group flags (one per weight, unstructured), float score buffer
    assert pruner.engine_state_bytes() == elements * (1 + 4 + 1 + 4)


def test_minus_inf_marking_equals_masked_fill():
    from patcli.engine.masks import as_bytes, mark_pruned_

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        scores = torch.randn(5000, generator=generator, dtype=dtype)
        scores[::7] = 0.0
        scores[::11] = -0.0
        scores[::13] = float("-inf")
        keep = torch.rand(5000, generator=generator) > 0.4
        expected = scores.masked_fill(~keep, float("-inf"))
        result = mark_pruned_(scores.clone(), as_bytes(keep).to(dtype))  # the way group flags are marked
        assert result.dtype == dtype and torch.equal(result, expected)
        assert torch.equal(scores.isneginf() | ~keep, result.isneginf())
        scores[::17] = float("inf")  # the in-place marking also keeps +inf where kept
        in_place = scores.clone()
        assert mark_pruned_(in_place, keep.to(dtype)) is in_place  # no new tensor
        assert torch.equal(in_place, scores.masked_fill(~keep, float("-inf")))


def test_magnitude_masks_reuse_one_score_buffer_per_weight_on_cpu(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.7, total_steps=20, frequency=5)
    before = pruner.engine_state_bytes()
    train_steps(tiny_mlp, optimizer, 12)
    buffers = [b.data_ptr() for b in pruner._scratch]
    train_steps(tiny_mlp, optimizer, 8)
    assert [b.data_ptr() for b in pruner._scratch] == buffers  # the same memory at every update
    weights = sum(w.numel() * w.element_size() for w in pruner.masks.weights)
    flags = sum(k.numel() for k in pruner.layout.group_keep)
    # counted as engine state from the start, as a resumed pruner (which has not made it yet) counts it too
    assert pruner.engine_state_bytes() == before == pruner.masks.state_bytes() + flags + weights
    assert pruner.sparsity() == pytest.approx(0.7, abs=1 / pruner.masks.accounted_numel())


def test_a_scorer_of_ones_own_without_score_buffers_still_works(tiny_mlp):
    from patcli.engine.scorers import Scorer

    class SquaredMagnitude(Scorer):  # written against the plain scores(weights) signature
        def scores(self, weights):
            return [w.detach() ** 2 for w in weights]

    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=10,
                    scorer=SquaredMagnitude()).attach(optimizer)
    train_steps(tiny_mlp, optimizer, 3)
    assert pruner._scratch is None and pruner.sparsity() == pytest.approx(0.5, abs=1 / pruner.masks.accounted_numel())


def test_a_scorer_of_ones_own_that_keeps_a_tensor_has_it_counted_as_engine_state(tiny_mlp):
    from patcli.engine.scorers import Scorer

    class Smoothed(Scorer):  # an exponential average of |w|, saved with the pruner
        def __init__(self):
            self.average = [torch.zeros_like(p) for p in tiny_mlp.parameters() if p.dim() == 2]

        def scores(self, weights):
            return [a.mul_(0.5).add_(w.detach().abs()) for a, w in zip(self.average, weights)]

        def state_dict(self):
            return {f"average.{i}": a for i, a in enumerate(self.average)}

    plain = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=10)
    smoothed = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=10, scorer=Smoothed())
    held = sum(a.numel() * 4 for a in smoothed.scorer.average)
    buffers = sum(w.numel() * 4 for w in plain.masks.weights)  # magnitude's reused score buffers; Smoothed takes none
    assert smoothed.engine_state_bytes() == plain.engine_state_bytes() - buffers + held


@pytest.mark.parametrize("scorer", ["magnitude", "hessian"])
@pytest.mark.parametrize(("inputs", "allocation"), [(20, "global"), (400, "uniform"), (400, "global")])
def test_nan_scores_stop_the_update_with_the_layers_name(scorer, inputs, allocation):
    """NaN weights (a diverged run) would break the exact count on every threshold path: the update says so instead.

    20 inputs take the small-input selection, 400 the sampled one (200k scores)."""
    from patcli.engine import ALLOCATIONS, SCORERS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, 500), nn.Linear(500, 10))
    with torch.no_grad():
        model[0].weight.view(-1)[: inputs * 50] = float("nan")
    pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=10,
                    scorer=SCORERS.get(scorer)(), allocation=ALLOCATIONS.get(allocation)())
    if scorer == "hessian":
        model(torch.randn(4, inputs)).sum().backward()
        pruner.observe()
    with pytest.raises(FloatingPointError, match=r"^pruning scores of 0\.weight are NaN at step 0: .*diverged"):
        pruner.update_masks(0)
    assert pruner.masks.sparsity() == 0.0  # no mask was half-made


def test_infinite_scores_of_both_signs_are_not_taken_for_nan(tiny_mlp):
    """-inf marks pruned weights; an overflowing +inf score beside one sums to NaN without being NaN."""
    pruner = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=10)
    pruner.update_masks(0)
    with torch.no_grad():
        kept = pruner.masks.keep[0].nonzero()[0]
        pruner.masks.weights[0][tuple(kept)] = float("inf")
    pruner.update_masks(1, target=0.6)
    assert pruner.masks.sparsity() == pytest.approx(0.6, abs=1 / pruner.masks.accounted_numel())
    assert pruner.masks.keep[0][tuple(kept)]  # the largest magnitude is kept


def test_weights_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while writing leaves the previous model.safetensors, never half of a new one."""
    import patcli.runner as runner

    path = tmp_path / "model.safetensors"
    runner.save_tensors({"w": torch.ones(3)}, path)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(runner, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        runner.save_tensors({"w": torch.zeros(3)}, path)
    assert torch.equal(load_file(str(path))["w"], torch.ones(3)) and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
