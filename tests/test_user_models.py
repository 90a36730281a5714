"""Models of one's own: what is pruned, what is refused in one line, and what a saved config can never make patcli run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import patcli
from patcli.engine import Pruner, prune_during_training
from patcli.engine.schedules import SCHEDULES

from conftest import result_of

OWN = ["model=custom", "trainer.epochs=1"]


@pytest.mark.parametrize("target, extra, expected", [
    ("user_models.TupleOut", [], "model: does not fit dataset=digits (TypeError: "),
    ("user_models.AllFrozen", [], "model: AllFrozen has no trainable parameters"),
    ("user_module_with_a_missing_dependency.M", [],
     "model._target_: importing user_module_with_a_missing_dependency failed: No module named 'a_dependency_that_is_not_installed'"),
    ("torch.load", ["+model.f=evil.pkl"], "model._target_: torch.load is not an nn.Module class"),
    ("torch.nn.Linear", ["+model.in_features=64", "+model.out_features=10", "+model.bias={_target_:os.remove,path:x}"],
     "model.bias._target_: Hydra directives are not followed here"),
    ("torch.nn.Linear", ["model.in_features=64"], "model.in_features: unknown key; allowed: model._target_; an argument of "
                                                  "your model's class is added with a plus: +model.in_features=VALUE"),
])
def test_a_model_of_ones_own_that_cannot_run_is_one_line(cli, tmp_path, target, extra, expected):
    code, _, err = cli("train", *OWN, f"model._target_={target}", *extra, "hydra.run.dir=run")
    assert code == 2 and err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_saved_config_naming_something_else_than_a_model_runs_nothing(cli, tmp_path):
    """export and load_pruned rebuild a model from files on disk: a hand-edited or foreign one must not run code."""
    code, _, err = cli("train", "model.hidden=[16]", "trainer.epochs=1", "pruning.sparsity=0.5", "hydra.run.dir=run")
    assert code == 0, err
    code, _, err = cli("export", "run", "--no-latency")
    assert code == 0, err
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    description = tmp_path / "run" / "export" / "model.json"
    saved = json.loads(description.read_text())
    for target, why in (("torch.load", "torch.load is not an nn.Module class"),
                        ("os.remove", "os is a standard-library module, not imported for a model")):
        saved["model"] = {"name": "custom", "_target_": target, "f": str(victim)}
        description.write_text(json.dumps(saved))
        with pytest.raises(patcli.config.ConfigError, match=why):
            patcli.load_pruned(tmp_path / "run")
    snapshot = tmp_path / "run" / ".hydra" / "config.yaml"
    snapshot.write_text(snapshot.read_text().replace("model:\n", f"model:\n  _target_: os.remove\n  path: {victim}\n", 1))
    code, _, err = cli("export", "run")
    assert code == 2 and "model and data no longer match its record" in err, err  # refused before building anything
    assert victim.read_text() == "still here"


def test_load_pruned_of_a_run_never_exported_says_what_to_run(cli, tmp_path):
    code, _, err = cli("train", "model.hidden=[16]", "trainer.epochs=1", "hydra.run.dir=run")
    assert code == 0, err
    with pytest.raises(FileNotFoundError, match=r"holds no export \(model.json\); run `patcli export .*run` first"):
        patcli.load_pruned(tmp_path / "run")


def test_a_frozen_layer_is_never_pruned(cli, tmp_path):
    """Gradient scores are 0 on a frozen weight: it was pruned first, and the model fell to chance."""
    code, _, err = cli("train", *OWN, "model._target_=user_models.FrozenFirst", "scorer=gradient", "pruning.sparsity=0.5",
                       "hydra.run.dir=run")
    assert code == 0, err
    record = result_of(tmp_path / "run")
    assert set(record["per_layer_sparsity"]) == {"head.1.weight", "head.3.weight"}
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert int((weights["features.weight"] == 0).sum()) == 0
    # said once in the run's log, though the config check builds a pruner of its own first
    assert (tmp_path / "run" / "run.log").read_text().count("features.weight left dense: frozen") == 1


def test_a_prunable_weight_the_optimizer_does_not_train_is_refused(tiny_mlp):
    pruner = Pruner(tiny_mlp, sparsity=0.5, schedule=SCHEDULES.get("agp")(), total_steps=10)
    optimizer = torch.optim.SGD([p for name, p in tiny_mlp.named_parameters() if not name.startswith("0.")], lr=0.1)
    with pytest.raises(ValueError, match=r"^0.weight is prunable but not in the optimizer; allowed: .*exclude=\['0.weight'\]"):
        pruner.attach(optimizer)


def test_the_regularizer_steps_each_weight_with_its_own_groups_learning_rate(tiny_mlp):
    """Biases at lr 0 in the first group must not switch the penalty off for the weights in the second."""
    weights = [p for name, p in tiny_mlp.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in tiny_mlp.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.SGD([{"params": biases, "lr": 0.0}, {"params": weights, "lr": 0.1}], lr=0.0)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.5, total_steps=10, schedule="constant",
                                   regularizer="lasso")
    pruner.regularizer.lam = 1.0
    before = [w.detach().clone() for w in weights]
    optimizer.step()  # no gradients: the weights move by the proximal step alone
    for old, new in zip(before, weights):
        torch.testing.assert_close(new.detach(), torch.nn.functional.softshrink(old, 0.1) * (new != 0))


def test_regrowth_and_regularizer_are_named_like_the_other_parts(tiny_mlp):
    optimizer = torch.optim.SGD(tiny_mlp.parameters(), lr=0.1)
    pruner = prune_during_training(tiny_mlp, optimizer, sparsity=0.8, total_steps=400, schedule="constant", regrowth="rigl")
    assert pruner.regrowth.name == "rigl" and pruner.masks.sparsity() == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="^unknown regularizer 'ridge'; allowed: group_lasso, lasso$"):  # ValueError as README says
        prune_during_training(nn.Linear(4, 4), torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1), sparsity=0.5,
                              total_steps=10, regularizer="ridge")


@pytest.mark.parametrize("target, extra", [("user_models.Named", ["+model.name=mine"]), ("user_models.Outer.Inner", [])])
def test_a_key_called_name_and_a_nested_class_are_ones_own_to_use(cli, tmp_path, target, extra):
    code, _, err = cli("train", *OWN, f"model._target_={target}", *extra, "hydra.run.dir=run")
    assert code == 0, err
    assert result_of(tmp_path / "run")["config"]["model"] == {"_target_": target, **({"name": "mine"} if extra else {})}


def test_only_a_single_plus_adds_a_name_key_of_ones_own():
    from patcli.hydra_app import UsageError, check_group_overrides

    check_group_overrides(["+model.name=mine"])
    for override in ("model.name=cnn", "++model.name=cnn"):
        with pytest.raises(UsageError, match=r"^model.name: an option is chosen with model=cnn, not renamed"):
            check_group_overrides([override])


def test_an_export_of_a_model_whose_class_takes_name_loads_with_that_name(cli, tmp_path):
    """The export wrote the model's label over the user's own `name`, and load_pruned dropped it: the class was
    rebuilt with its default (a ReLU where training used a Tanh, outputs 0.23 apart, without a word)."""
    code, _, err = cli("train", *OWN, "model._target_=user_models.Named", "+model.name=mine", "pruning.sparsity=0.5",
                       "hydra.run.dir=run")
    assert code == 0, err
    code, _, err = cli("export", "run", "--no-latency")
    assert code == 0, err
    assert patcli.load_pruned(tmp_path / "run").label == "mine"


def test_an_export_written_before_model_name_was_kept_apart_still_loads(cli, tmp_path):
    code, _, err = cli("train", "model.hidden=[16]", "trainer.epochs=1", "pruning.sparsity=0.5", "hydra.run.dir=run")
    assert code == 0, err
    code, _, err = cli("export", "run", "--no-latency")
    assert code == 0, err
    description = tmp_path / "run" / "export" / "model.json"
    saved = json.loads(description.read_text())
    older = {"model": {"name": saved.pop("model_name"), **saved.pop("model")}, **saved}
    description.write_text(json.dumps(older))
    model = patcli.load_pruned(tmp_path / "run")
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [16, 10]


def test_a_model_whose_forward_cannot_run_with_fewer_channels_is_refused_before_training(cli, tmp_path):
    """It trained to the end, then the export that ends a structured run failed: recorded failed, metrics dropped."""
    code, _, err = cli("train", *OWN, "model._target_=user_models.FixedWidth", "pruning=neurons", "pruning.sparsity=0.5",
                       "hydra.run.dir=run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: model: FixedWidth's forward does not run with fewer neurons (one cut from each of its "
                          "1 layers: RuntimeError: "), err
    assert "allowed: a forward that takes its sizes from its weights, or pruning=unstructured" in err
    assert not (tmp_path / "run").exists()
    code, _, err = cli("train", *OWN, "model._target_=user_models.FixedWidth", "pruning.sparsity=0.5", "hydra.run.dir=run")
    assert code == 0, err  # unstructured pruning never changes its shapes
    # the structured baseline cuts neurons whatever pruning says: checked as the run it records
    code, _, err = cli("prune-post", *OWN, "model._target_=user_models.FixedWidth", "baseline=structured",
                       "hydra.run.dir=post")
    assert code == 2 and err.startswith("error: model: FixedWidth's forward does not run with fewer neurons"), err
    assert "allowed: a forward that takes its sizes from its weights, or an unstructured baseline" in err
    assert not (tmp_path / "post").exists() and not (tmp_path / "outputs").exists()
