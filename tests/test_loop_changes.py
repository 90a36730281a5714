"""The pruner when a user's loop changes things under it: weights loaded or replaced, the model compiled, a second
optimizer, weights left out of pruning, a build that fails half way."""

import logging

import pytest
import torch
from torch import nn

from patcli.engine import prune_during_training


def train_steps(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def test_dense_shadow_keeps_weights_loaded_between_steps(tiny_mlp):
    """The step copied the dense copy over the weights: a checkpoint loaded (or a re-initialisation) after the pruner
    was built was thrown away at the next step, while in-place masking keeps it."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=100, schedule="oneshot",
                                   masking="dense_shadow")
    train_steps(tiny_mlp, optimizer, 3)
    tiny_mlp.load_state_dict({**tiny_mlp.state_dict(), "2.weight": torch.ones(32, 32)})
    keep = pruner.masks.keep[1]
    before = tiny_mlp[2].weight.detach().clone()
    train_steps(tiny_mlp, optimizer, 1, seed=1)
    moved = (tiny_mlp[2].weight.detach() - before)[keep]
    assert moved.abs().max() < 0.5  # one SGD step from the loaded ones, not back to the weights before the load
    assert bool((tiny_mlp[2].weight[~keep] == 0).all())
    shadow = pruner.masking.shadow[1]
    assert torch.equal(shadow[keep], tiny_mlp[2].weight.detach()[keep])


def test_weights_replaced_under_the_pruner_are_named_instead_of_masked_as_orphans(tiny_mlp):
    """load_state_dict(assign=True) or a move to the meta device puts new Parameter objects in the model: the pruner
    went on masking the old tensors, and attach() then said the weight was not in the optimizer."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot")
    train_steps(tiny_mlp, optimizer, 2)
    tiny_mlp.load_state_dict({k: v.clone() for k, v in tiny_mlp.state_dict().items()}, assign=True)
    message = (r"^0.weight is no longer the model's parameter \(load_state_dict\(assign=True\), or a move that made new "
               r"ones\); allowed: build the Pruner \(and the optimizer\) for the model as it is now$")
    with pytest.raises(ValueError, match=message):
        pruner.attach(torch.optim.SGD(tiny_mlp.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=message):
        pruner.update_masks(1)


def test_a_mask_pass_that_fails_after_the_model_moved_says_which_weight_and_why(tiny_mlp, monkeypatch):
    """After model.to("cuda") the multiply after the step fails inside torch ("Expected all tensors to be on the same
    device") before the next update could name the move; it is named at once."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot")
    train_steps(tiny_mlp, optimizer, 1)
    # this machine has one device: masks of another dtype stand in for masks left on the old device
    pruner.masks._multipliers = [m.double() for m in pruner.masks.multipliers]

    def across_devices(*args):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(torch, "_foreach_mul_", across_devices)
    with pytest.raises(ValueError, match=r"^0.weight is now torch.float32 on cpu, but the pruner was built for "
                                         r"torch.float64 on cpu; allowed: move or cast the model before building"):
        train_steps(tiny_mlp, optimizer, 1)
    monkeypatch.undo()  # a failure of the pass with the masks in place is torch's own, passed on as it is
    pruner.masks._multipliers = [m.float() for m in pruner.masks.multipliers]
    monkeypatch.setattr(torch, "_foreach_mul_", across_devices)
    with pytest.raises(RuntimeError, match="^Expected all tensors to be on the same device$"):
        train_steps(tiny_mlp, optimizer, 1)


def test_a_second_optimizer_that_steps_pruned_weights_is_named(tiny_mlp, caplog):
    """An optimizer the pruner is not attached to trained pruned weights back to life without a word (a phase-2
    optimizer never attached, or one built over model.parameters() by mistake)."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot")
    train_steps(tiny_mlp, optimizer, 1)
    other = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="patcli.engine.pruner"):
        train_steps(tiny_mlp, other, 2)
    warnings = [r.getMessage() for r in caplog.records if "not the one the pruner is attached to" in r.getMessage()]
    assert warnings == ["an optimizer that is not the one the pruner is attached to stepped 0.weight, 2.weight, 4.weight: "
                        "their pruned weights can grow back; allowed: pruner.attach(optimizer) to the optimizer that trains "
                        "them"]
    assert pruner.sparsity() < 0.5  # what the warning is about


def test_pruned_weights_added_to_another_optimizer_after_its_first_step_are_named(tiny_mlp, caplog):
    """The check looked at each optimizer once, at its first step: a param group added later went unseen."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot")
    train_steps(tiny_mlp, optimizer, 1)
    other = torch.optim.SGD([tiny_mlp[0].bias], lr=0.1)  # a phase that trains biases only: fine
    with caplog.at_level(logging.WARNING, logger="patcli.engine.pruner"):
        train_steps(tiny_mlp, other, 1)
        assert "not the one the pruner is attached to" not in caplog.text
        other.add_param_group({"params": [tiny_mlp[2].weight]})
        train_steps(tiny_mlp, other, 2)
    warnings = [r.getMessage() for r in caplog.records if "not the one the pruner is attached to" in r.getMessage()]
    assert warnings == ["an optimizer that is not the one the pruner is attached to stepped 2.weight: their pruned "
                        "weights can grow back; allowed: pruner.attach(optimizer) to the optimizer that trains them"]


def test_a_compiled_model_is_pruned_as_the_module_it_wraps(tiny_mlp):
    """torch.compile wraps the model: channel modes asked for a channel_groups method the wrapper cannot have, and
    states saved on the compiled model did not load into a pruner of the plain one (names prefixed _orig_mod.)."""
    compiled = torch.compile(tiny_mlp)
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(compiled, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot",
                                   pattern="neurons", exclude=["4.weight"])
    assert pruner.masks.names[:2] == ["0.weight", "0.bias"]
    plain = prune_during_training(tiny_mlp, torch.optim.SGD(tiny_mlp.parameters(), lr=0.1), sparsity=0.5,
                                  total_steps=10, schedule="oneshot", pattern="neurons", exclude=["4.weight"])
    plain.load_state_dict(pruner.state_dict())
    # as older versions named them: patterns and states of the wrapper's names still serve
    older = prune_during_training(compiled, torch.optim.SGD(tiny_mlp.parameters(), lr=0.1), sparsity=0.5, total_steps=10,
                                  schedule="oneshot", pattern="neurons", exclude=["_orig_mod.4.weight"])
    assert older.masks.names == pruner.masks.names
    saved = {(f"mask._orig_mod.{k[5:]}" if k.startswith("mask.") else k): v for k, v in pruner.state_dict().items()}
    plain.load_state_dict(saved)


def test_a_build_that_fails_takes_its_scorers_model_hooks_away(tiny_mlp):
    """A channel scorer hooks the model before the rest is checked: each refused build left two more hooks running
    at every forward."""
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in tiny_mlp.modules())  # noqa: E731
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    for mistake in ({"masking": "dense-shadow"}, {"sparsity": 0.999}):
        with pytest.raises(ValueError):
            prune_during_training(tiny_mlp, optimizer, **{"sparsity": 0.5, "total_steps": 10, "pattern": "neurons",
                                                          "scorer": "activation", **mistake})
    assert hooks() == 0


def test_weights_that_cannot_be_pruned_are_named_when_include_names_them_or_they_are_frozen(caplog):
    """An include naming only weights patcli never prunes (an LSTM's, attention's in_proj_weight), or layers frozen when
    the pruner was built, left them dense without a word, and the whole target fell on the rest."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.LSTM(4, 8), "body": nn.Linear(8, 8), "head": nn.Linear(8, 2)})
    model["body"].requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="patcli.engine.pruner"):
        prune_during_training(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10,
                              include=["rnn.weight_*", "body.weight", "head.weight"])
    messages = [r.getMessage() for r in caplog.records]
    assert ("include pattern 'rnn.weight_*' matches no prunable weight (only the weights of Linear and Conv layers "
            "that train, and are not tied to an embedding, are pruned)") in messages
    assert ("body.weight left dense: frozen (requires_grad=False) when the Pruner was built; the target is spread over "
            "the other weights (exclude it to say so)") in messages


def test_a_channel_scorer_that_saw_no_batch_says_the_model_may_be_in_eval_mode(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="oneshot", pattern="neurons",
                          scorer="activation")
    tiny_mlp.eval()
    with pytest.raises(RuntimeError, match=r"^scorer 'activation' saw no training batches before the mask update "
                                           r"\(it reads them in training mode: call model.train\(\)\)$"):
        train_steps(tiny_mlp, optimizer, 1)


@pytest.mark.parametrize("scorer", ["gradient", "hessian"])
def test_a_layer_frozen_for_a_phase_is_ranked_by_what_it_last_learned_not_pruned_in_index_order(tiny_mlp, scorer):
    """With no gradient a weight was scored 0 at each step: a layer frozen through a window of steps had all-zero
    scores at the update and lost the first weights in index order."""
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.05)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=20, frequency=5, scorer=scorer,
                                   allocation="uniform")
    train_steps(tiny_mlp, optimizer, 6)  # through the update at step 5, which closes a window with gradients
    last_window = pruner.scorer.mean(pruner.masks.weights)[1].clone()
    tiny_mlp[2].requires_grad_(False)
    train_steps(tiny_mlp, optimizer, 5, seed=1)  # steps 6-10, the update at step 10 included: no gradient for it
    assert [u.step for u in pruner.updates][-1] == 10
    assert bool((last_window > 0).any())
    assert torch.equal(pruner.scorer.mean(pruner.masks.weights)[1], last_window)  # what it last learned, not zeros
    tiny_mlp[2].requires_grad_(True)  # and once it trains again, its window starts afresh
    train_steps(tiny_mlp, optimizer, 1, seed=2)
    assert not torch.equal(pruner.scorer.mean(pruner.masks.weights)[1], last_window)


def test_a_layer_with_gradients_on_some_steps_averages_over_every_step_of_the_window():
    """A branch used on 2 steps of 10 weighs its zeros in (the expected loss change over the window), as a layer with
    a gradient at every step does; only a layer with no gradient at all since the update keeps the window before."""
    from patcli.engine import SCORERS

    scorer = SCORERS.get("gradient")()
    weights = [torch.ones(3), torch.ones(3)]
    grads = torch.tensor([1.0, 2.0, 3.0])
    for step in range(10):
        scorer.observe(weights, [grads, grads if step in (3, 7) else None])
    used, rarely_used = scorer.mean(weights)
    torch.testing.assert_close(used, grads)
    torch.testing.assert_close(rarely_used, grads * 2 / 10)


def test_an_output_layer_tied_to_an_embedding_is_no_frozen_layer_and_no_match_for_include(caplog):
    """Tied to a frozen embedding it was named "left dense: frozen (exclude it)", though it is never prunable; an
    include naming only it was not warned of."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(10, 8), "body": nn.Linear(8, 8), "head": nn.Linear(8, 10, bias=False)})
    model["head"].weight = model["embed"].weight
    model["embed"].requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="patcli.engine.pruner"):
        prune_during_training(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10,
                              include=["head.weight", "body.weight"])
    messages = [r.getMessage() for r in caplog.records]
    assert not any("frozen" in m for m in messages), messages
    assert ("include pattern 'head.weight' matches no prunable weight (only the weights of Linear and Conv layers that "
            "train, and are not tied to an embedding, are pruned)") in messages
