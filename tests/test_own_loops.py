"""The pruner inside training loops users write: resumed optimizers, GradScaler, skipped steps, frozen layers."""

import copy
import gc
import re

import pytest
import torch
from torch import nn

from patcli.engine import PATTERNS, SCHEDULES, SCORERS, Pruner, prune_during_training


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    inputs, targets = batch(step)
    return nn.functional.cross_entropy(model(inputs), targets)


def test_the_regularizer_follows_the_learning_rate_of_an_optimizer_loaded_from_a_checkpoint(tiny_mlp):
    """optimizer.load_state_dict replaces the param-group dicts: the proximal step must read the new ones."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="constant", regularizer="lasso")
    pruner.regularizer.lam = 1.0
    optimizer.load_state_dict(optimizer.state_dict())
    optimizer.param_groups[0]["lr"] = 0.001  # as a scheduler would set it after resuming
    weight = tiny_mlp[2].weight
    before = weight.detach().clone()
    optimizer.step()  # no gradients: the weight moves by the proximal step alone, lr · lam
    torch.testing.assert_close(weight.detach(), nn.functional.softshrink(before, 0.001) * (weight != 0))


def test_a_fused_optimizer_under_grad_scaler_scores_unscaled_gradients_and_skips_an_overflowing_step(tiny_mlp):
    """GradScaler leaves the gradients scaled for a fused optimizer and hands it grad_scale / found_inf instead."""
    plain = copy.deepcopy(tiny_mlp)
    runs = {}
    for name, model in (("plain", plain), ("scaled", tiny_mlp)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=100, frequency=50,
                        scorer=SCORERS.get("gradient")()).attach(optimizer)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000) if name == "scaled" else None
        for step in range(6):
            optimizer.zero_grad()
            loss = loss_of(model, step)
            if scaler is None:
                if step != 3:  # the step the scaler will skip
                    loss.backward()
                    optimizer.step()
                continue
            scaler.scale(loss).backward()
            if step == 3:
                model[0].weight.grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
            scaler.step(optimizer)
            scaler.update()
        runs[name] = [s.clone() for s in pruner.scorer._sums] + [p.detach().clone() for p in model.parameters()]
        assert pruner.update_masks(pruner.step, target=0.5).sparsity == 0.5  # no NaN from the skipped step's inf
    for plain_value, scaled_value in zip(runs["plain"], runs["scaled"]):  # the scores, then the weights
        torch.testing.assert_close(scaled_value, plain_value, rtol=1e-4, atol=1e-7)


def test_finish_makes_the_last_update_a_run_that_saw_fewer_steps_missed(tiny_mlp):
    """A GradScaler that skips steps leaves the pruner short of the schedule's end: finish() reaches the target."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    pruner = Pruner(tiny_mlp, sparsity=0.8, schedule=SCHEDULES.get("agp")(end=1.0), total_steps=20, frequency=5).attach(optimizer)
    for step in range(19):  # one of 20 steps skipped
        optimizer.zero_grad()
        loss_of(tiny_mlp, step).backward()
        optimizer.step()
    assert [u.step for u in pruner.updates] == [0, 5, 10, 15]
    assert pruner.masks.sparsity() < 0.8
    update = pruner.finish()
    prunable = sum(w.numel() for w in pruner.masks.weights)
    assert update.step == 19 and sum(int((w == 0).sum()) for w in pruner.masks.weights) == round(0.8 * prunable)
    assert pruner.finish() is None  # once only


def test_a_resumed_pruner_keeps_its_update_history_and_reports_its_sparsity(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.01)
    pruner = Pruner(tiny_mlp, sparsity=0.6, schedule=SCHEDULES.get("agp")(), total_steps=20, frequency=4).attach(optimizer)
    for step in range(17):
        optimizer.zero_grad()
        loss_of(tiny_mlp, step).backward()
        optimizer.step()
    resumed = Pruner(tiny_mlp, sparsity=0.6, schedule=SCHEDULES.get("agp")(), total_steps=20, frequency=4)
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.updates == pruner.updates and len(resumed.updates) == 5
    assert resumed.current_sparsity() == pruner.current_sparsity() == pytest.approx(resumed.sparsity())
    assert resumed.current_sparsity() > 0.5


def test_structured_pruning_leaves_a_frozen_layer_whole_even_where_another_layers_neurons_reach_it(tiny_mlp):
    """Layer 2's neurons own input columns of layer 4: with layer 4 frozen, they are no candidates either."""
    tiny_mlp[4].requires_grad_(False)
    frozen = tiny_mlp[4].weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in tiny_mlp.parameters() if p.requires_grad], lr=0.05)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.25, total_steps=8, pattern="neurons", schedule="constant")
    assert pruner.layout.layer_names == ["0"]  # layer 0's neurons reach only the trained layer 2
    for step in range(8):
        optimizer.zero_grad()
        loss_of(tiny_mlp, step).backward()
        optimizer.step()
    assert torch.equal(tiny_mlp[4].weight, frozen)
    assert int((tiny_mlp[2].weight == 0).all(0).sum()) == 8  # 25% of layer 0's 32 neurons are off downstream


def test_filters_prune_under_frozen_batch_norms_which_go_with_their_channels():
    """Fine-tuning with frozen BatchNorm γ/β (left out of the optimizer) is common: the filters stay prunable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    for norm in (model[1], model[4]):
        norm.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    pruner = prune_during_training(model, optimizer, sparsity=0.5, total_steps=6, pattern="filters", schedule="constant")
    assert pruner.layout.layer_names == ["0", "3"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8, generator=generator)), torch.randint(0, 4, (4,), generator=generator)).backward()
        optimizer.step()
    pruned = 0
    for conv, norm in ((model[0], model[1]), (model[3], model[4])):
        off = (conv.weight == 0).flatten(1).all(1)
        pruned += int(off.sum())
        assert bool((norm.weight[off] == 0).all() and (norm.bias[off] == 0).all())  # a pruned filter's γ/β go with it
    assert pruned >= 4 and pruner.sparsity() == pytest.approx(0.5, abs=0.06)


def test_lbfgs_is_refused_because_its_inner_forward_passes_would_see_unmasked_weights(tiny_mlp):
    pruner = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10)
    with pytest.raises(ValueError, match=r"^LBFGS evaluates the model several times .*allowed: optimizers that update once"):
        pruner.attach(torch.optim.LBFGS(tiny_mlp.parameters()))


def test_a_pruner_state_of_another_pattern_model_or_schedule_is_refused_before_anything_is_loaded(tiny_mlp):
    """2:4 keeps one flag per weight like unstructured, but an unstructured mask is no 2:4 mask."""
    unstructured = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10)
    unstructured.update_masks(0)
    state = unstructured.state_dict()
    two_four = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10, pattern=PATTERNS.get("nm")())
    with pytest.raises(ValueError, match=r"^the pruner state was saved with pattern Unstructured\(\), this pruner uses "
                                         r"NM\(n=2, m=4\); allowed: the state of a pruner built the same way"):
        two_four.load_state_dict(state)
    wider = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    other_model = Pruner(wider, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10)
    with pytest.raises(ValueError, match=r"^the pruner state does not fit this pruner: its mask of 0\.weight is \(32, 16\), "
                                         r"the weight here \(64, 16\) \(another model\); allowed: the state of a pruner "
                                         r"built the same way$"):
        other_model.load_state_dict(state)
    sparser = Pruner(tiny_mlp, sparsity=0.3, schedule=SCHEDULES.get("constant")(), total_steps=10)
    with pytest.raises(ValueError, match=r"^the pruner state was saved with schedule Constant\(final_sparsity=0.5, .*, this "
                                         r"pruner uses Constant\(final_sparsity=0.3, .*allowed: the state of a pruner built "
                                         r"the same way \(sparsity, total_steps, frequency, schedule"):
        sparser.load_state_dict(state)  # a sparser state would bring pruned weights back
    agp = {steps: Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=steps) for steps in (10, 20)}
    with pytest.raises(ValueError, match=r"end_step=8\), this pruner uses AGP\(.*end_step=15\)"):
        agp[20].load_state_dict(agp[10].state_dict())  # a resumed run of another length would miss its final update
    for pruner in (two_four, other_model, sparser, agp[20]):
        assert pruner.step == 0 and all(bool(k.all()) for k in pruner.masks.keep)


def test_a_pruner_state_with_or_without_dense_weights_aside_is_refused_before_anything_is_loaded(tiny_mlp):
    """A plain state loaded into a dense_shadow pruner raised KeyError 'shadow.0.weight' after step and masks were
    overwritten; the other way round, the dense weights were dropped without a word. (Reversal keeps them too, and a
    state of another regrowth mode is refused for that first.)"""

    def built(**parts):
        return Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10, **parts)

    plain = built()
    plain.update_masks(0)
    plain.step = 4
    reversal, fresh = built(masking="dense_shadow"), built()
    with pytest.raises(ValueError, match=r"^the pruner state holds none of the dense weights that pruning\.masking="
                                         r"dense_shadow \(or reversal\) keeps aside, and this pruner needs them; allowed: "
                                         r"the state of a pruner built the same way$"):
        reversal.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match=r"^the pruner state holds the dense weights that .* this pruner keeps none;"):
        fresh.load_state_dict(reversal.state_dict())
    for pruner in (reversal, fresh):
        assert pruner.step == 0 and all(bool(k.all()) for k in pruner.masks.keep)
    fresh.load_state_dict(plain.state_dict())  # the same build loads
    assert fresh.step == 4 and [torch.equal(a, b) for a, b in zip(fresh.masks.keep, plain.masks.keep)] == [True] * 3


def test_a_pruner_state_of_a_model_with_other_names_is_refused_and_nothing_is_loaded(tiny_mlp):
    """The same shapes under other names (a Sequential inside a module): step and history were loaded, then KeyError."""
    saved = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10)
    saved.update_masks(0)
    saved.step = 4
    wrapped = nn.Module()
    wrapped.net = copy.deepcopy(tiny_mlp)
    other = Pruner(wrapped, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10)
    with pytest.raises(ValueError, match=r"^the pruner state does not fit this pruner: it has no mask of net\.0\.weight "
                                         r"\(another model or include/exclude\)"):
        other.load_state_dict(saved.state_dict())
    assert other.step == 0 and other.updates == [] and all(bool(k.all()) for k in other.masks.keep)


def test_the_engine_raises_a_type_error_for_a_wrong_type_and_a_value_error_otherwise_as_readme_says(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    for arguments, error, message in [
        (dict(scorer="magnitud"), ValueError, "unknown scorer 'magnitud'; allowed: "),  # was a KeyError
        (dict(schedule="agpp"), ValueError, "unknown schedule 'agpp'; allowed: "),
        (dict(sparsity="0.9"), TypeError, "sparsity must be a number within 0 <= value < 1, got '0.9'"),
        (dict(sparsity=None), TypeError, "sparsity must be a number"),
        (dict(total_steps="100"), TypeError, "total_steps must be an integer >= 1 (optimizer steps), got '100'"),
        (dict(sparsity=1.5), ValueError, "sparsity must be a number within 0 <= value < 1, got 1.5"),
        (dict(total_steps=0), ValueError, "total_steps must be an integer >= 1"),
    ]:
        with pytest.raises(error, match=f"^{re.escape(message)}"):
            prune_during_training(tiny_mlp, optimizer, **{"sparsity": 0.5, "total_steps": 10, **arguments})


def test_a_target_the_layer_caps_cannot_reach_is_refused_when_the_pruner_is_built(tiny_mlp):
    """It was accepted and failed at the mask update that first passed the caps, 65% into training."""
    from patcli.engine.allocation import AllocationError

    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    for allocation in ("uniform", "global"):
        with pytest.raises(AllocationError, match=r"^sparsity 0.995 needs \d+ pruned weights but the per-layer cap "
                                                  r"max_layer_sparsity=0.99 allows at most"):
            prune_during_training(tiny_mlp, optimizer, sparsity=0.995, total_steps=1000, allocation=allocation)
    assert not optimizer._optimizer_step_post_hooks  # nothing was attached
    from patcli.engine import REGULARIZERS  # a regularizer's target is its own: sparsity is not what it reaches

    for target in (0.5, None):
        pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.995, total_steps=20, frequency=5,
                                       regularizer=REGULARIZERS.get("lasso")(lam=1e-3, target=target))
        pruner.detach()
    with pytest.raises(AllocationError, match=r"^sparsity 0.995 needs"):
        prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=20,
                              regularizer=REGULARIZERS.get("lasso")(lam=1e-3, target=0.995))


def test_a_pruner_state_a_part_cannot_take_leaves_the_pruner_as_it_was(tiny_mlp):
    """scorer=random's state needs its draw count: a magnitude pruner's state raised KeyError 'draws' after step and
    masks were overwritten."""
    saved = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10)
    saved.update_masks(0)
    saved.step = 4
    random = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10, scorer=SCORERS.get("random")())
    state = saved.state_dict()
    del state["scorer"]  # as saved by a version that did not record the scorer: its parts' own keys are all there is
    with pytest.raises(ValueError, match=r"^the pruner state does not fit this pruner \(KeyError: 'draws'\), saved by a "
                                         r"pruner built another way \(model, scorer, allocation or regrowth\); allowed: the state of a pruner built the same way$"):
        random.load_state_dict(state)
    assert random.step == 0 and random.updates == [] and all(bool(k.all()) for k in random.masks.keep)
    assert all(bool(k.all()) for k in random.layout.group_keep) and random.scorer.state_dict()["draws"] == 0


def test_states_whose_parts_fill_in_later_still_resume(tiny_mlp):
    """Sensitivity's curves come with its first measurement and SET's random stream was not saved by older versions:
    a key-by-key check refused both."""
    from patcli.engine import ALLOCATIONS, REGROWTHS

    def sensitivity():
        return Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("agp")(begin=0, end=4), total_steps=10, frequency=2,
                      allocation=ALLOCATIONS.get("sensitivity")(), evaluate=lambda: float(loss_of(tiny_mlp, 99).detach()))

    measured = sensitivity()
    measured.update_masks(2)
    assert any(k.startswith("allocation.") for k in measured.state_dict())
    resumed = sensitivity()
    resumed.load_state_dict(measured.state_dict())
    assert [torch.equal(a, b) for a, b in zip(resumed.masks.keep, measured.masks.keep)] == [True] * 3
    dynamic = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10,
                     regrowth=REGROWTHS.get("set")(delta_t=2))
    older = {k: v for k, v in dynamic.state_dict().items() if k != "regrowth.generator"}
    older["step"] = torch.tensor(3)
    resumed = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10,
                     regrowth=REGROWTHS.get("set")(delta_t=2, seed=1))  # other first masks: the load must replace them
    assert not all(torch.equal(a, b) for a, b in zip(resumed.masks.keep, dynamic.masks.keep))
    resumed.load_state_dict(older)
    assert resumed.step == 3 and [torch.equal(a, b) for a, b in zip(resumed.masks.keep, dynamic.masks.keep)] == [True] * 3


def _train_ddp_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    net = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = prune_during_training(model, optimizer, sparsity=0.8, total_steps=30, frequency=5, scorer="hessian")
    for step in range(30):
        inputs, targets = batch(step)
        shard = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch; DDP averages the gradients
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(inputs[shard]), targets[shard]).backward()
        optimizer.step()
    torch.save({"keep": [k.clone() for k in pruner.masks.keep], "weights": [p.detach().clone() for p in model.parameters()]},
               f"{out_dir}/rank{rank}.pt")
    # DDP's reducer holds the process group: freed only at interpreter exit, gloo's threads were torn down
    # under it and about one run in ten aborted ("terminate called without an active exception").
    del net
    gc.collect()
    dist.destroy_process_group()


def test_under_ddp_every_rank_prunes_the_same_weights_to_the_exact_count(tmp_path):
    """Gradients are averaged before the step, so every rank scores the same and chooses the same masks."""
    torch.multiprocessing.spawn(_train_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["keep"], ranks[1]["keep"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]))
    pruned = sum(int((~k).sum()) for k in ranks[0]["keep"])
    assert pruned == round(0.8 * sum(k.numel() for k in ranks[0]["keep"]))
    weights = [w for w in ranks[0]["weights"] if w.dim() == 2]
    assert sum(int((w == 0).sum()) for w in weights) == pruned


def test_a_regularizers_closing_mask_keeps_the_largest_weights_and_no_other_scorer_is_taken():
    """The close is by magnitude (another scorer once kept weights the penalty had zeroed); a scorer that would only
    be carried along unused is refused, so no record names a recipe that never ran."""
    from patcli.engine import REGULARIZERS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))
    lasso = dict(lam=0.05, warmup=4, target=0.6)
    with pytest.raises(ValueError, match=r"^regularizer=lasso zeroes weights by its penalty and closes by magnitude; "
                                         r"allowed with scorer=magnitude \(got scorer=gradient\)$"):
        Pruner(model, sparsity=0.6, schedule=SCHEDULES.get("constant")(), total_steps=20,
               regularizer=REGULARIZERS.get("lasso")(**lasso), scorer=SCORERS.get("gradient")())
    pruner = Pruner(model, sparsity=0.6, schedule=SCHEDULES.get("constant")(begin=0, end=10), total_steps=20, frequency=3,
                    regularizer=REGULARIZERS.get("lasso")(**lasso))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.attach(optimizer)
    before = {}
    closing = pruner.update_masks

    def seen(t, *args, **kwargs):
        before[t] = [w.detach().abs().clone() for w in pruner.masks.weights]
        return closing(t, *args, **kwargs)

    pruner.update_masks = seen
    inputs, targets = torch.randn(64, 20), torch.randint(0, 10, (64,))
    for _ in range(11):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    for magnitude, keep in zip(before[10], pruner.masks.keep):  # uniform allocation: a magnitude threshold per layer
        assert float(magnitude[keep].min()) >= float(magnitude[~keep].max())
    assert pruner.masks.sparsity() == pytest.approx(0.6, abs=1e-3)


def test_rigl_regrows_at_zero_and_refuses_dense_shadow_masking():
    from patcli.engine import REGROWTHS
    from patcli.engine.masks import InplaceMasking

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(ValueError, match="regrowth=rigl regrows weights at zero, which a dense copy would overwrite"):
        Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("constant")(), total_steps=20, masking="dense_shadow",
               regrowth=REGROWTHS.get("rigl")(delta_t=5))
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("constant")(), total_steps=20,
                    regrowth=REGROWTHS.get("rigl")(delta_t=5))
    assert isinstance(pruner.masking, InplaceMasking)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    for step in range(5):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()
    old = [k.clone() for k in pruner.masks.keep]
    optimizer.zero_grad()
    loss_of(model, 5).backward()
    pruner.regrow(5)
    grown = [~o & k for o, k in zip(old, pruner.masks.keep)]
    assert sum(int(g.sum()) for g in grown) > 0
    assert all(bool((w[g] == 0).all()) for w, g in zip(pruner.masks.weights, grown))


def test_rigl_regrows_nothing_on_a_step_the_grad_scaler_skips(tiny_mlp):
    """A fused optimizer's GradScaler skips an overflowing step inside the kernel: its inf gradients must not grow weights."""
    from patcli.engine import REGROWTHS

    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05, fused=True)
    pruner = Pruner(tiny_mlp, sparsity=0.8, schedule=SCHEDULES.get("constant")(), total_steps=30,
                    regrowth=REGROWTHS.get("rigl")(delta_t=3)).attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        before = [k.clone() for k in pruner.masks.keep]
        optimizer.zero_grad()
        scaler.scale(loss_of(tiny_mlp, step)).backward()
        if step == 3:  # a regrowth step, overflowing
            pruned = (~pruner.masks.keep[0]).nonzero()[0]
            tiny_mlp[0].weight.grad[tuple(pruned)] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**9  # the step was skipped
    assert all(torch.equal(a, b) for a, b in zip(before, pruner.masks.keep))  # and nothing regrew
    assert pruner.updates == []  # step 3 was the first regrowth update


def test_head_importance_drops_a_batch_whose_scaled_gradient_overflowed():
    """The scorer reads activation gradients in backward, before a GradScaler unscales anything: one overflowing
    batch made every head's score NaN and stopped the run at the next mask update."""
    from patcli.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(20, 8, 1, 4, 32, 8, 2, 0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = prune_during_training(model, optimizer, sparsity=0.25, total_steps=8, scorer="head_importance",
                                   schedule=SCHEDULES.get("oneshot")(begin=5), allocation="uniform", pattern="heads",
                                   frequency=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    inputs = [torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(s)) for s in range(5)]
    for step, x in enumerate(inputs):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 20), x.reshape(-1))
        optimizer.zero_grad()
        scaler.scale(loss * (1e36 if step == 2 else 1.0)).backward()  # one overflowing batch
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**15  # the scaler skipped that step
    counts, sums = pruner.scorer._counts[0], pruner.scorer._sums[0]
    assert float(counts) == 4 and bool(torch.isfinite(sums).all()) and bool((sums > 0).all())
    pruner.update_masks(5)  # no NaN: the update ranks the heads
    assert [int(k.sum()) for k in pruner.layout.group_keep] == [3]


def test_rigl_ranks_the_true_gradients_under_a_grad_scaler(tiny_mlp):
    """The fused step unscales .grad in place before the post-step hook: dividing again would rank grad / scale²."""
    from patcli.engine import REGROWTHS

    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05, fused=True)
    pruner = Pruner(tiny_mlp, sparsity=0.8, schedule=SCHEDULES.get("constant")(), total_steps=30,
                    regrowth=REGROWTHS.get("rigl")(delta_t=3)).attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    seen = []
    update = pruner.regrowth.update
    pruner.regrowth.update = lambda t, weights, grads, keep: (seen.append([g.clone() for g in grads]), update(t, weights, grads, keep))[1]
    for step in range(4):
        if step == 3:
            reference = copy.deepcopy(tiny_mlp)
            loss_of(reference, step).backward()
        optimizer.zero_grad()
        scaler.scale(loss_of(tiny_mlp, step)).backward()
        scaler.step(optimizer)
        scaler.update()
    (grads,) = seen
    for grad, layer in zip(grads, (reference[0], reference[2], reference[4])):
        torch.testing.assert_close(grad, layer.weight.grad)


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("arguments, message", [
    (dict(total_steps=3 * 7 / 2), r"total_steps must be an integer >= 1 \(optimizer steps\), got 10.5"),
    (dict(total_steps=20, frequency=2.5), r"frequency must be an integer >= 1 \(optimizer steps\), got 2.5"),
    (dict(total_steps=20, max_layer_sparsity=1.5), r"max_layer_sparsity must be a number within 0 <= value < 1, got 1.5"),
    (dict(total_steps=20, max_layer_sparsity=float("nan")), r"max_layer_sparsity must be a number within 0 <= value < 1, got nan"),
    (dict(total_steps=20, sparsity="0.5"), r"sparsity must be a number within 0 <= value < 1, got '0.5'"),
    (dict(total_steps=20, schedule="agp"), r"schedule must be a Schedule object, e.g. SCHEDULES.get\(name\)\(\), got 'agp'"),
    (dict(total_steps=20, exclude="2.weight"), r"exclude takes a list of name patterns, e.g. exclude=\['2.weight'\]"),
    (dict(total_steps=20, exclude=None), r"exclude takes a list of name patterns, e.g. exclude=\['\*.weight'\]; got None"),
    (dict(total_steps=20, include=["*", None]), r"include takes a list of name patterns \(strings\); got None in it"),
    (dict(total_steps=20, model=object()), r"model must be a torch.nn.Module; got object"),
    (dict(total_steps=20, model=nn.Sequential(nn.LazyLinear(4))), r"0.weight is not initialized yet \(a lazy module\): "
                                                                  r"run one forward pass before building the pruner"),
    (dict(total_steps=20, exclude=["head.weight"]), r"exclude pattern 'head.weight' matches no parameter of the model; "
                                                    r"allowed: fnmatch patterns over 0.weight, 0.bias, 2.weight, 2.bias, "
                                                    r"4.weight, 4.bias"),
])
def test_a_pruner_built_in_python_names_a_bad_argument(arguments, message):
    """A float step count (epochs · batches / accumulation) used to put the schedule's end between two steps, so the
    target was never reached; a bare string exclude was read letter by letter."""
    arguments = {"sparsity": 0.9, "schedule": SCHEDULES.get("linear")(end=1.0), **arguments}
    model = arguments.pop("model", None) or small_model()
    with pytest.raises((ValueError, TypeError), match=f"^{message}"):
        Pruner(model, **arguments)


def test_attach_names_what_is_not_an_optimizer():
    pruner = Pruner(small_model(), sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=20)
    with pytest.raises(TypeError, match=r"^attach\(\) takes a torch.optim.Optimizer; got dict$"):
        pruner.attach({"lr": 0.1})


def test_numpy_integer_step_counts_are_taken():
    import numpy as np

    pruner = Pruner(small_model(), sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=np.int64(20), frequency=np.int64(5))
    assert pruner.schedule.end_step == 15


@pytest.mark.parametrize("parts, message", [
    (dict(schedule="agp", regrowth="rigl"), "regrowth=rigl is sparse at the target from the first step and decides its own updates"),
    (dict(schedule="alternating", regrowth="rigl"), "regrowth=rigl is sparse at the target"),
    (dict(schedule="alternating", regrowth="reversal"), "regrowth=reversal and schedule=alternating both lift masks"),
    (dict(schedule="constant", pattern="nm", regularizer="lasso"), "regularizer=lasso shrinks single weights; allowed with pruning=unstructured"),
    (dict(schedule="constant", regrowth="rigl", regularizer="lasso"), "regularizer=lasso masks what it zeroes, which regrowth=rigl would undo"),
])
def test_the_engine_refuses_the_combinations_the_cli_refuses(parts, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        prune_during_training(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=24, frequency=3, **parts)


def test_regularizer_none_by_name_is_no_regularizer_as_on_the_command_line():
    model = small_model()
    pruner = prune_during_training(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10,
                                   regularizer="none")
    assert pruner.regularizer is None


def test_a_model_cast_after_the_pruner_was_built_is_named_at_the_next_update():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = prune_during_training(model, optimizer, sparsity=0.5, total_steps=20, frequency=5)
    with pytest.raises(ValueError, match=r"^0.weight is now torch.float64 on cpu, but the pruner was built for torch.float32 "
                                         r"on cpu; allowed: move or cast the model before building the Pruner"):
        for step in range(20):
            if step == 3:
                model.double()
            optimizer.zero_grad()
            model(torch.randn(4, 8, dtype=model[0].weight.dtype)).sum().backward()
            optimizer.step()
    assert pruner.step == 5  # stopped at the first update after the cast, step 5


@pytest.mark.parametrize("init", ["erk", "random"])
def test_dynamic_sparse_training_starts_at_exactly_the_target_count(init):
    from patcli.engine import REGROWTHS

    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("constant")(), total_steps=20,
                    regrowth=REGROWTHS.get("rigl")(delta_t=5, init=init))
    assert sum(int((w == 0).sum()) for w in pruner.masks.weights) == round(0.8 * (256 + 512 + 64))  # 666: ERK rounded to 665


def test_a_run_length_and_targets_from_numpy_work_as_python_numbers_and_resume():
    import numpy as np

    def built():
        torch.manual_seed(0)
        model = nn.Linear(16, 16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, prune_during_training(model, optimizer, sparsity=np.float32(0.5), total_steps=np.int64(20),
                                                       frequency=np.int64(2), schedule="alternating")

    model, optimizer, pruner = built()
    for _ in range(20):
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert pruner.sparsity() == 0.5 and pruner.schedule.end_step == 15
    _, _, again = built()
    again.load_state_dict(pruner.state_dict())  # the same settings, whether numpy's or Python's
    assert again.step == 20


def test_alternating_refuses_phases_of_no_steps():
    with pytest.raises(ValueError, match="^compressed: 0 is out of range"):
        SCHEDULES.get("alternating")(compressed=0)


class PlainParameterMLP(nn.Module):
    """A hidden layer of plain parameters (no nn.Linear), whose channels the model describes itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(x @ self.w1.T + self.b1))

    def channel_groups(self, kind: str):
        from patcli.engine.layouts import ChannelGroup, Slice

        return [ChannelGroup(name="hidden", channels=16, slices=[Slice("w1", 0), Slice("b1", 0), Slice("out.weight", 1)],
                             shape=torch.Size([16, 8]))]


def test_include_patterns_are_checked_against_the_channel_groups_a_model_describes():
    for include in (["*"], ["w1"], (name for name in ["w1"])):  # a generator is read once, not used up by the check
        model = PlainParameterMLP()
        pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2,
                        pattern=PATTERNS.get("neurons")(), include=include)
        pruner.update_masks(0)
        assert int((model.w1.abs().sum(1) == 0).sum()) == 8
    with pytest.raises(ValueError, match=r"^include pattern 'w2' matches no parameter of the model; allowed: fnmatch "
                                         r"patterns over w1, b1, out.weight, out.bias$"):
        Pruner(PlainParameterMLP(), sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2,
               pattern=PATTERNS.get("neurons")(), include=["w2"])


def test_head_importance_still_scores_neurons_and_a_users_own_schedule_passes_the_combination_check():
    from patcli.engine import REGROWTHS
    from patcli.engine.schedules import Linear

    class MyLinear(Linear):  # never registered: no name
        pass

    model = small_model()
    neurons = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=10, pattern=PATTERNS.get("neurons")(),
                     scorer=SCORERS.get("head_importance")())
    assert len(neurons.scorer._sums) == 2  # one gate score per hidden neuron of both hidden layers
    pruner = Pruner(small_model(), sparsity=0.5, schedule=MyLinear(end=1.0), total_steps=10, frequency=2,
                    regrowth=REGROWTHS.get("reversal")())
    assert pruner.schedule.end_step == 9


def test_a_baseline_run_with_regrowth_in_its_config_plans_as_before():
    """Post-training baselines ignore regrowth (with a warning); its plan's one-shot trial must not refuse it.
    pat_from_dense runs it, over its fine-tuning budget (5 of the 20 steps): it must fit there."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from patcli.config import ConfigError, parse_run_config
    from patcli.hydra_app import conf_dir
    from patcli.runner import plan

    def planned(*overrides):
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", [*overrides, "regrowth=rigl", "trainer.max_steps=20"])
        return plan(parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                                            resolve=True)))

    assert planned("baseline=magnitude").total_steps == 20
    assert planned("baseline=pat_from_dense", "regrowth.delta_t=1").total_steps == 20
    with pytest.raises(ConfigError, match=r"^regrowth.delta_t: 50 steps reaches regrowth.end \(step 4\)"):
        planned("baseline=pat_from_dense")  # the default interval is longer than the whole budget


def test_an_exclude_the_layout_cannot_use_is_no_error_one_exclude_serves_every_mode():
    """The output layer has no prunable neurons: excluding it means nothing in neurons mode, but the same override
    must work for a sweep over modes, a structured baseline of an unstructured config, a dense run's report and
    the export of a run made before patterns were checked."""
    from patcli.engine.masks import select_prunable
    from patcli.engine.structure import channel_groups

    for pattern in (PATTERNS.get("unstructured")(), PATTERNS.get("neurons")()):
        model = small_model()
        pruner = Pruner(model, sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2, pattern=pattern,
                        exclude=["4.weight"])
        pruner.update_masks(0)
        if pattern.name == "unstructured":
            assert not bool((model[4].weight == 0).any())
        else:  # its input columns go with the hidden neurons pruned before it
            assert pruner.masks.names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    model = small_model()
    assert list(select_prunable(model, ["*"], ["nothing.at.all"])) == ["0.weight", "2.weight", "4.weight"]  # no check here
    assert len(channel_groups(model, "neurons", ["*"], ["4.weight"])) == 2
    for select in (lambda: select_prunable(model, exclude="2.weight"), lambda: channel_groups(model, "neurons", exclude="2.weight")):
        with pytest.raises(TypeError, match=r"^exclude takes a list of name patterns"):
            select()


def test_a_weight_shared_by_two_modules_can_be_named_by_either():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.fc2.weight = self.fc1.weight

        def forward(self, x):
            return self.out(self.fc2(torch.relu(self.fc1(x))))

    for name in ("fc1.weight", "fc2.weight"):
        pruner = Pruner(Shared(), sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2, include=[name])
        assert len(pruner.masks.weights) == 1
        pruner = Pruner(Shared(), sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=2, exclude=[name])
        assert pruner.masks.names == ["out.weight"]  # excluded by either of its names


@pytest.mark.parametrize("name, pattern", [("lasso", "unstructured"), ("group_lasso", "neurons")])
def test_a_step_the_grad_scaler_skips_takes_no_proximal_step_under_a_fused_optimizer(tiny_mlp, name, pattern):
    """The fused kernel skips an overflowing step on the device: the regularizer's shrinkage must skip it too."""
    from patcli.engine import REGULARIZERS

    optimizer = torch.optim.AdamW(tiny_mlp.parameters(), lr=0.05, fused=True)
    Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=30, pattern=PATTERNS.get(pattern)(),
           regularizer=REGULARIZERS.get(name)(lam=1.0)).attach(optimizer)  # its hooks keep it
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(loss_of(tiny_mlp, step)).backward()
        before = [p.detach().clone() for p in tiny_mlp.parameters()]
        if step == 2:
            tiny_mlp[0].weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        changed = [not torch.equal(a, p) for a, p in zip(before, tiny_mlp.parameters())]
        assert all(changed) if step < 2 else not any(changed), (step, changed)
    assert scaler.get_scale() == 2.0**9  # the last step was skipped


def test_a_pruner_detached_and_attached_again_still_scores_channels_by_activation(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=4, frequency=2, scorer="activation",
                                   pattern="neurons")
    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_mlp.modules())

    watching = hooks()
    pruner.detach()
    assert watching > 0 and hooks() == 0
    pruner.attach(optimizer)
    pruner.attach(optimizer)  # twice: still one set of hooks, each batch counted once
    assert hooks() == watching
    for step in range(4):
        optimizer.zero_grad()
        loss_of(tiny_mlp, step).backward()
        optimizer.step()
    assert [u.step for u in pruner.updates][-1] == 3 and pruner.sparsity() > 0.3
    assert all(int(c) <= 2 for c in pruner.scorer._counts)


def test_a_regularizer_runs_reported_sparsity_counts_the_zeros_it_made_before_any_mask(tiny_mlp):
    from patcli.engine import REGULARIZERS

    model = tiny_mlp
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, sparsity=0.8, schedule=SCHEDULES.get("agp")(), total_steps=40,
                    regularizer=REGULARIZERS.get("lasso")(lam=0.5)).attach(optimizer)
    for step in range(5):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()
    zeros = sum(int((w == 0).sum()) for w in pruner.masks.weights)
    assert zeros / pruner.masks.accounted_numel() > pruner.masks.sparsity() + 0.05  # the penalty zeroed more than masks hold
    assert pruner.current_sparsity() == zeros / pruner.masks.accounted_numel()


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()


def test_one_part_object_given_to_two_pruners_binds_to_each_run_apart():
    """Binding changed the object in place: the second pruner rewrote the first one's schedule (it ended at 0.5 for
    a 0.8 target), and a shared gradient scorer crashed on the second model's shapes."""
    schedule, scorer = SCHEDULES.get("agp")(end=0.5), SCORERS.get("gradient")()
    torch.manual_seed(0)
    first, second = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    runs = []
    for model, sparsity, steps in ((first, 0.8, 100), (second, 0.5, 20)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        runs.append((model, optimizer, prune_during_training(model, optimizer, sparsity=sparsity, total_steps=steps,
                                                             schedule=schedule, scorer=scorer)))
    for (model, optimizer, _), steps in zip(runs, (100, 20)):
        train_steps(model, optimizer, range(steps))
    assert (runs[0][2].schedule.end_step, runs[1][2].schedule.end_step) == (50, 10)
    assert runs[0][2].sparsity() == round(0.8 * (16 * 32 + 32 * 4)) / (16 * 32 + 32 * 4)
    assert runs[1][2].sparsity() == 0.5
    assert not hasattr(schedule, "end_step") or schedule.final_sparsity == 0.0  # the object given stays unbound


def test_none_names_no_part_except_the_regularizer_and_is_refused_for_the_others():
    """"none" used to mean "the default" for every part: pattern="none" pruned 90% unstructured (the CLI's pruning=none
    trains dense), allocation="none" switched to uniform, schedule=None ended in an AttributeError."""
    for argument, value, error, message in (
        ("pattern", "none", ValueError, r"^unknown pruning mode 'none'; allowed: block, filters"),
        ("allocation", "none", ValueError, r"^unknown allocation 'none'; allowed: erk, global"),
        ("scorer", "none", ValueError, r"^unknown scorer 'none'; allowed: activation"),
        ("schedule", None, TypeError, r"^schedule must be a name \(agp, alternating"),
        ("allocation", None, TypeError, r"^allocation must be a name \(erk, global, lamp, sensitivity, uniform\) or an object"),
    ):
        model = small_model()
        with pytest.raises(error, match=message):
            prune_during_training(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=10,
                                  **{argument: value})
    with pytest.raises(TypeError, match=r"^schedule must be a Schedule object"):
        Pruner(small_model(), sparsity=0.5, schedule=None, total_steps=10)


@pytest.mark.parametrize("regrowth", [None, "reversal"])
def test_attach_after_detach_takes_the_weights_as_trained_and_masks_them_again(tiny_mlp, regrowth):
    """Re-attached, a reversal pruner copied its stale dense copy over what trained while detached, and an in-place
    one left pruned weights non-zero for the next forward."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05, momentum=0.9)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=40, frequency=5, schedule="constant",
                                   regrowth=regrowth)
    train_steps(tiny_mlp, optimizer, range(11))
    pruner.detach()
    train_steps(tiny_mlp, optimizer, range(11, 21))
    trained = [w.detach().clone() for w in pruner.masks.weights]
    assert sum(int((w[~k] != 0).sum()) for w, k in zip(trained, pruner.masks.keep)) > 0  # pruned ones moved unmasked
    pruner.attach(optimizer)
    for weight, keep, as_trained in zip(pruner.masks.weights, pruner.masks.keep, trained):
        assert torch.equal(weight.detach(), as_trained * keep)  # masked at once, nothing else changed
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    train_steps(tiny_mlp, optimizer, range(21, 22))  # a step that moves nothing: the weights stay as trained, masked
    for weight, keep, as_trained in zip(pruner.masks.weights, pruner.masks.keep, trained):
        assert torch.equal(weight.detach(), as_trained * keep)


def test_a_pruner_state_of_another_schedule_setting_exclude_or_layer_shape_is_refused(tiny_mlp):
    """Alternating phases, AGP's power, another exclude (its extra masks were dropped and the run ended at 0.379 for
    0.5) and transposed layers of the same sizes were all loaded."""
    def built(model=tiny_mlp, schedule=("agp", {}), **options):
        return Pruner(model, sparsity=0.5, schedule=SCHEDULES.get(schedule[0])(**schedule[1]), total_steps=40, **options)

    for saved, loading, message in (
        (built(schedule=("alternating", dict(compressed=5, decompressed=5))),
         built(schedule=("alternating", dict(compressed=3, decompressed=7))),
         r"^the pruner state was saved with schedule_settings Alternating\(.*compressed=5, decompressed=5.*this pruner "
         r"uses Alternating\(.*compressed=3, decompressed=7"),
        (built(schedule=("agp", dict(power=3.0))), built(schedule=("agp", dict(power=1.0))), r"power=3\.0.*power=1\.0"),
        (built(), built(exclude=["4.weight"]), r"^the pruner state does not fit this pruner: it masks 4\.weight, which "
                                                r"this pruner does not prune \(another model or include/exclude\)"),
        (built(nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 32))), built(nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8))),
         r"^the pruner state does not fit this pruner: its mask of 0\.weight is \(8, 32\), the weight here \(32, 8\)"),
    ):
        saved.update_masks(0, 0.5)
        saved.step = 7
        with pytest.raises(ValueError, match=message):
            loading.load_state_dict(saved.state_dict())
        assert loading.step == 0 and all(bool(k.all()) for k in loading.masks.keep)


def test_a_list_parameter_with_an_element_of_the_wrong_type_names_the_parameter():
    from patcli.engine import ALLOCATIONS

    with pytest.raises(TypeError, match=r"^allocation 'sensitivity': trials must be a list of numbers, got \[0\.5, 'x'\]$"):
        ALLOCATIONS.get("sensitivity")(trials=[0.5, "x"])


def test_a_part_of_ones_own_keeps_its_constructor_and_its_own_attributes():
    """Made anew from its dataclass fields, a scorer with an __init__ of its own failed (a missing argument)."""
    from patcli.engine import Scorer

    class Powered(Scorer):
        def __init__(self, power: float) -> None:
            self.power = power

        def scores(self, weights, out=None):
            return [w.detach().abs() ** self.power for w in weights]

    pruner = Pruner(small_model(), sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=4, scorer=Powered(2.0))
    assert pruner.scorer.power == 2.0
    pruner.update_masks(0)
    assert pruner.sparsity() == 0.5
    given = Powered(3.0)
    assert Pruner(small_model(), sparsity=0.5, schedule=SCHEDULES.get("oneshot")(), total_steps=4, scorer=given).scorer is not given


def test_detach_and_attach_with_no_step_between_keeps_what_reversal_knows_of_pruned_weights(tiny_mlp):
    """Re-attaching made the weights as they were the dense copy: a pruned weight's dense value became 0, and
    reversal could never bring it back."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=40, frequency=4, schedule="linear",
                                   regrowth="reversal")
    train_steps(tiny_mlp, optimizer, range(9))
    dense = [s.clone() for s in pruner.masking.shadow]
    assert sum(float(s[~k].abs().sum()) for s, k in zip(dense, pruner.masks.keep)) > 0
    pruner.detach()
    pruner.attach(optimizer)
    assert all(torch.equal(s, d) for s, d in zip(pruner.masking.shadow, dense))
    pruner.detach()  # a step while detached moves kept and pruned weights alike: the dense copy takes the move
    before = [w.detach().clone() for w in pruner.masks.weights]
    train_steps(tiny_mlp, optimizer, range(9, 10))
    moved = [w.detach() - b for w, b in zip(pruner.masks.weights, before)]
    pruner.attach(optimizer)
    for shadow, was, move in zip(pruner.masking.shadow, dense, moved):
        torch.testing.assert_close(shadow, was + move)


def test_a_second_pruner_attached_to_the_same_weights_takes_over_from_the_first(tiny_mlp, caplog):
    """A notebook cell run twice attached two pruners: both masked the weights, each by its own schedule."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05)
    first = prune_during_training(tiny_mlp, optimizer, sparsity=0.9, total_steps=20, schedule="oneshot")
    with caplog.at_level("WARNING", logger="patcli.engine.pruner"):
        second = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=20, schedule="oneshot")
    assert "0.weight is already pruned by another attached Pruner: that one is detached, this one takes over" in caplog.text
    train_steps(tiny_mlp, optimizer, range(3))
    assert (first.step, first.updates, second.step) == (0, [], 3)
    zeros = sum(int((w == 0).sum()) for w in second.masks.weights)
    assert zeros == round(0.5 * sum(w.numel() for w in second.masks.weights))  # not 0.9: the first masks nothing
    second.detach()
    third = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=20, schedule="oneshot")
    assert third.optimizer is optimizer and caplog.text.count("takes over") == 1  # the detached one is no owner now


def overflowing_step(model, scaler, optimizer, seed: int, overflow: bool) -> None:
    x = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(seed))
    loss = nn.functional.cross_entropy(model(x).reshape(-1, 20), x.reshape(-1))
    optimizer.zero_grad()
    scaler.scale(loss * (1e36 if overflow else 1.0)).backward()
    scaler.step(optimizer)
    scaler.update()


def scaled_gpt(schedule: str, frequency: int = 50):
    """A tiny GPT pruned by head_importance under a GradScaler, with a fused optimizer (whose skipped steps count)."""
    from patcli.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(20, 8, 1, 4, 32, 8, 2, 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    pruner = prune_during_training(model, optimizer, sparsity=0.5, total_steps=6, scorer="head_importance",
                                   schedule=schedule, allocation="uniform", pattern="heads", frequency=frequency)
    return model, optimizer, pruner, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)


def test_head_importance_ranks_by_the_last_window_when_every_batch_since_an_update_overflowed():
    """With a fused optimizer a GradScaler's skipped step still counts, so a mask update can follow a window whose
    only batch overflowed (every update with frequency=1): the window had been opened (zeroed) by the dropped batch,
    and the update stopped training with "saw no training batches"."""
    model, optimizer, pruner, scaler = scaled_gpt("agp", frequency=1)
    overflowing_step(model, scaler, optimizer, 0, overflow=False)  # the update at step 0 closes this window
    last_window = [s.clone() for s in pruner.scorer.group_scores()]
    overflowing_step(model, scaler, optimizer, 1, overflow=True)  # the update at step 1 sees only this dropped batch
    assert scaler.get_scale() == 2.0**9 and [u.step for u in pruner.updates] == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(pruner.scorer.group_scores(), last_window))
    for seed in range(2, 6):
        overflowing_step(model, scaler, optimizer, seed, overflow=False)
    assert pruner.sparsity() == 0.5


def test_head_importance_whose_first_batches_all_overflowed_still_updates_but_one_never_trained_is_an_error():
    """A GradScaler's first steps often overflow: an update then has no scores yet (its target is 0 under agp at
    step 0) and must not stop training; a scorer that never saw a training batch (model left in eval mode) still is
    an error."""
    model, optimizer, pruner, scaler = scaled_gpt("agp", frequency=2)
    overflowing_step(model, scaler, optimizer, 0, overflow=True)
    assert [(u.step, u.sparsity) for u in pruner.updates] == [(0, 0.0)]
    # an update that would prune with no scores at all (every channel tied at 0) is refused: it picked them in order
    model, optimizer, _, scaler = scaled_gpt("oneshot")
    with pytest.raises(RuntimeError, match=r"^scorer 'head_importance' has no scores for the mask update at step 0: "
                                           r"every batch it saw was dropped \(its gradient overflowed under a GradScaler\)"):
        overflowing_step(model, scaler, optimizer, 0, overflow=True)
    model.eval()
    idle = prune_during_training(model, torch.optim.SGD(model.parameters(), lr=0.01), sparsity=0.5, total_steps=6,
                                 scorer="head_importance", schedule="oneshot", allocation="uniform", pattern="heads")
    with pytest.raises(RuntimeError, match="^scorer 'head_importance' saw no training batches before the mask update"):
        idle.update_masks(0)


def test_lamp_on_channels_never_brings_back_a_pruned_channel():
    """The channel path of a threshold allocation searched counts without the floors (channels already pruned): after
    an update that overshot its budget, LAMP returned fewer pruned filters than the masks held, and a monotone
    schedule brought a dead filter back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    pruner = prune_during_training(model, optimizer, sparsity=0.5, total_steps=30, frequency=1, schedule="agp",
                                   pattern="filters", allocation="lamp")
    history = []
    pruner.on_update = lambda update: history.append([int((~k).sum()) for k in pruner.layout.group_keep])
    for step in range(30):
        generator = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 5, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(b >= a for before, after in zip(history, history[1:]) for a, b in zip(before, after)), history
    assert history[-1] == [3, 3]


def test_sensitivity_curves_resume_exactly():
    """The measured loss curves were saved as float32: a resumed run ranked layers by rounded slopes."""
    from patcli.engine import ALLOCATIONS

    allocation = ALLOCATIONS.get("sensitivity")(refresh=False)
    allocation.curves = [[1 / 3, 1 / 3 + 1e-12, 0.7], [1 / 7, 0.2, 0.9]]
    resumed = ALLOCATIONS.get("sensitivity")(refresh=False)
    resumed.load_state_dict(allocation.state_dict())
    assert resumed.curves == allocation.curves


@pytest.mark.parametrize("other", ["rigl delta_t=25", "set", "none", "lasso", "lasso lam=1e-3"])
def test_a_state_saved_with_another_regrowth_or_regularizer_is_refused(tiny_mlp, other):
    """They decide when and how masks change, as a schedule does, but their settings were not checked on loading."""
    from patcli.engine import REGROWTHS, REGULARIZERS

    def pruner(regrowth=None, regularizer=None):
        torch.manual_seed(0)
        return Pruner(copy.deepcopy(tiny_mlp), sparsity=0.8, total_steps=400, schedule=SCHEDULES.get("constant")(),
                      regrowth=regrowth, regularizer=regularizer)

    saved = pruner(regrowth=REGROWTHS.get("rigl")(delta_t=100)).state_dict()
    lasso = pruner(regularizer=REGULARIZERS.get("lasso")(lam=1e-4)).state_dict()
    kind, *setting = other.split()
    settings = {k: float(v) if "." in v or "e" in v else int(v) for k, v in (s.split("=") for s in setting)}
    if kind in ("rigl", "set", "none"):
        loading, source = pruner(regrowth=REGROWTHS.get(kind)(**settings)), saved
    else:
        loading = pruner(regularizer=REGULARIZERS.get(kind)(**settings))
        source = saved if not settings else lasso
    with pytest.raises(ValueError, match=r"^the pruner state was saved with (regrowth|regularizer) "):
        loading.load_state_dict(source)


def test_engine_state_bytes_is_the_same_for_the_same_state():
    """The CPU score buffer was counted only once the first update made it: a resumed pruner reported less."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, optimizer, prune_during_training(model, optimizer, sparsity=0.8, total_steps=10, frequency=5)

    model, optimizer, pruner = build()
    before = pruner.engine_state_bytes()
    for step in range(8):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()
    resumed_model, resumed_optimizer, resumed = build()
    resumed.load_state_dict(pruner.state_dict())
    assert before == pruner.engine_state_bytes() == resumed.engine_state_bytes()
    weights = 16 * 32 + 32 * 4
    assert before == weights * (1 + 1 + 4 + 4)  # bool masks, the layout's flags (a group per weight), float masks, scores


def test_channel_scorers_are_not_counted_a_score_buffer_they_never_make(tiny_mlp):
    """They rank channels from their own sums, yet were counted a weight-sized buffer (80% too much through the CLI)."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=6, frequency=2, pattern="neurons",
                                   scorer="activation")
    for step in range(6):
        optimizer.zero_grad()
        loss_of(tiny_mlp, step).backward()
        optimizer.step()
    assert pruner._scratch is None
    flags = sum(k.numel() for k in pruner.layout.group_keep)
    assert pruner.engine_state_bytes() == pruner.masks.state_bytes() + flags + pruner.scorer.state_bytes()


def test_a_part_of_ones_own_with_a_function_setting_resumes_in_another_process(tiny_mlp):
    """The identity compared each setting's repr, and a function's holds its address, which differs per process."""
    import dataclasses
    from typing import Callable

    from patcli.engine.regularizers import Lasso

    @dataclasses.dataclass
    class ScaledLasso(Lasso):
        scale: Callable = print

    def settings():  # a new function object each call, as a new process would make
        def per_layer_lam(name):
            return 1.0
        return per_layer_lam

    def pruner():
        return Pruner(copy.deepcopy(tiny_mlp), sparsity=0.5, total_steps=10, schedule=SCHEDULES.get("constant")(),
                      regularizer=ScaledLasso(scale=settings()))

    saved = pruner()
    saved.step = 3
    resumed = pruner()
    resumed.load_state_dict(saved.state_dict())
    assert resumed.step == 3


@pytest.mark.parametrize(("saved_with", "loaded_with", "key"), [
    ({"scorer": "hessian"}, {"scorer": "movement"}, "scorer Hessian()"),  # the same sums, read as another statistic
    ({"scorer": "magnitude"}, {"scorer": "gradient"}, "scorer Magnitude()"),
    ({"allocation": "global"}, {"allocation": "lamp"}, "allocation Global()"),
    ({"max_layer_sparsity": 0.99}, {"max_layer_sparsity": 0.9}, "max_layer_sparsity 0.99"),
])
def test_a_state_saved_with_another_scorer_allocation_or_cap_is_refused(tiny_mlp, saved_with, loaded_with, key):
    """gradient, hessian and movement keep their sums under the same keys: a hessian state resumed a movement run
    with squared gradients as its movement, silently."""
    def build(**parts):
        model = copy.deepcopy(tiny_mlp)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, prune_during_training(model, optimizer, sparsity=0.5, total_steps=20, frequency=4, **parts)

    model, optimizer, saved = build(**saved_with)
    for step in range(6):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()
    _, _, loading = build(**loaded_with)
    with pytest.raises(ValueError, match=rf"^the pruner state was saved with {re.escape(key)}, this pruner uses .*; allowed: "
                                         r"the state of a pruner built the same way \(.*scorer, allocation, max_layer_sparsity"):
        loading.load_state_dict(saved.state_dict())
    assert loading.step == 0 and loading.updates == []
    _, _, same = build(**saved_with)
    same.load_state_dict(saved.state_dict())  # a seed is no setting: the random stream's state goes with the pruner
    assert same.step == 6 and len(same.updates) == len(saved.updates) == 2


def test_a_random_scorer_state_resumes_under_another_seed_setting(tiny_mlp):
    """The seed only starts the stream, whose position the state carries: it is left out of the identity."""
    saved = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10, scorer=SCORERS.get("random")(seed=1))
    saved.update_masks(0)
    resumed = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("constant")(), total_steps=10, scorer=SCORERS.get("random")(seed=2))
    resumed.load_state_dict(saved.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.masks.keep, saved.masks.keep))


def test_settings_written_differently_but_equal_resume(tiny_mlp):
    """ERK(power=1) against a state saved with power=1.0, trials as a tuple against a list, and Sensitivity's
    batches (read only by whoever builds evaluate, never by the engine) were refused as another allocation."""
    from patcli.engine import ALLOCATIONS

    def pruner(allocation):
        return Pruner(copy.deepcopy(tiny_mlp), sparsity=0.5, total_steps=10, schedule=SCHEDULES.get("constant")(),
                      allocation=allocation, evaluate=lambda: 1.0)

    sensitivity = ALLOCATIONS.get("sensitivity")
    for saved, loading in ((ALLOCATIONS.get("erk")(power=1.0), ALLOCATIONS.get("erk")(power=1)),
                           (sensitivity(trials=[0.5, 0.9]), sensitivity(trials=(0.5, 0.9))),
                           (sensitivity(batches=8), sensitivity(batches=None))):
        state = pruner(saved).state_dict()
        pruner(loading).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^the pruner state was saved with allocation ERK\(power=1\.0\), this pruner uses "
                                         r"ERK\(power=2\)"):
        pruner(ALLOCATIONS.get("erk")(power=2)).load_state_dict(pruner(ALLOCATIONS.get("erk")()).state_dict())
