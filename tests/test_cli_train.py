"""`patcli train` end to end on a tiny config, its run record, and one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from patcli.data import load_dataset
from patcli.config import NamedConfig
from patcli.models import build_model

from conftest import TINY, result_of, run_dir_of


def test_train_writes_a_complete_record_and_reaches_the_target(cli, tmp_path):
    code, out, err = cli("train", *TINY, "pruning.sparsity=0.8", f"hydra.run.dir={tmp_path}/run")
    assert code == 0, err
    run_dir = run_dir_of(out)
    assert run_dir == tmp_path / "run"
    record = result_of(run_dir)
    assert record["status"] == "ok" and record["method"] == "pat" and record["recipe"] == "agp+magnitude+global"
    assert record["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert set(record["metrics"]) == {"val", "test"} and 0 <= record["metrics"]["test"]["accuracy"] <= 1
    assert record["primary_metric"] == "accuracy" and record["higher_is_better"] is True
    assert record["params_prunable"] == 64 * 32 + 32 * 32 + 32 * 10
    assert record["params_total"] - record["params_nonzero"] == round(0.8 * record["params_prunable"])
    assert record["train_steps"] == 2 * 20 and record["schema_version"] == 1
    for key in ("package_version", "model_dataset_hash", "bytes_on_disk", "train_seconds", "per_layer_sparsity", "seed"):
        assert key in record
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in evals if r["kind"] == "eval"] == [1.0, 2.0]
    updates = [r for r in evals if r["kind"] == "mask_update"]
    assert updates[0]["step"] == 1 and updates[-1]["step"] == 31  # after the first step, and after step index 30 = schedule.end
    # the saved weights load into a plain model of the same architecture and hold the zeros
    data = load_dataset(NamedConfig("digits", {}))
    model = build_model(NamedConfig("mlp", {"hidden": [32, 32]}), data.meta)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, torch.nn.Linear))
    assert zeros == round(0.8 * record["params_prunable"])
    # written like any file of the user's (a temporary file's 0600 would hide them from a team sharing outputs/)
    modes = {name: (run_dir / name).stat().st_mode & 0o777 for name in ("result.json", "model.safetensors", "metrics.jsonl")}
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_dense_run_and_init_from(cli, tmp_path, monkeypatch):
    from patcli.training import Trainer

    code, out, _ = cli("train", *TINY, "pruning=none", f"hydra.run.dir={tmp_path}/dense")
    assert code == 0
    dense = result_of(run_dir_of(out))
    assert dense["method"] == "dense" and dense["achieved_sparsity"] < 0.01 and dense["target_sparsity"] == 0
    started_from = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (
        started_from.append({n: t.detach().clone() for n, t in self.model.state_dict().items()}), fit(self, *a, **k))[1])
    code, out, _ = cli("train", *TINY, f"trainer.init_from={tmp_path}/dense", "schedule=oneshot", "trainer.lr_schedule=cosine",
                       "trainer.warmup_steps=5")
    assert code == 0
    trained_dense = load_file(tmp_path / "dense" / "model.safetensors")
    (start,) = started_from
    assert start.keys() == trained_dense.keys() and all(torch.equal(start[n], trained_dense[n]) for n in start)
    tuned = result_of(run_dir_of(out))
    assert tuned["recipe"] == "oneshot+magnitude+global+init"
    assert tuned["total_train_steps"] == dense["train_steps"] + tuned["train_steps"]


def test_run_directories_never_collide(cli):
    dirs = {run_dir_of(cli("train", *TINY, "trainer.max_steps=3", "pruning=none")[1]) for _ in range(3)}
    assert len(dirs) == 3


def test_cfg_prints_the_composed_config_and_help_lists_groups(cli):
    code, out, _ = cli("train", "--cfg", "scorer=magnitude", "pruning.sparsity=0.7")
    assert code == 0 and "sparsity: 0.7" in out and "name: agp" in out
    code, out, _ = cli("train", "--help")
    assert code == 0
    for group in ("model", "dataset", "scorer", "schedule", "pruning", "trainer", "allocation"):
        assert f"{group}:" in out
    assert "agp" in out and "cubic" in out and "unstructured" in out



@pytest.mark.parametrize("args, expected", [
    (("train", "pruning.sparsity=abc"), "error: pruning.sparsity: expected float or null, got 'abc'"),
    (("train", "baseline=magnitude"), "error: baseline: 'magnitude' is a post-training baseline"),
    (("sweep", "pruning.sparsity=0.5,1.5"), "error: pruning.sparsity: 1.5 is out of range; allowed: 0.0 <= value < 1.0 "
                                            "(sweep job: pruning.sparsity=1.5)"),
    (("sweep", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "schedule.end=interval(0.3,1.5)"),
     "error: schedule.end: 1.5 is out of range"),
    (("sweep", "scorer=glob(nothing*)"), "error: scorer=glob(nothing*): the sweep makes no job"),
    (("sweep", "hydra/sweeper=optuna", "schedule.end=interval(0.3,0.9)"), "error: hydra.sweeper.direction: minimize does not fit"),
    (("train", "+experiment=pat_vs_post"), "error: experiment: +experiment=pat_vs_post is a sweep preset"),
    (("sweep", "hydra.sweep.subdir=x", "pruning.sparsity=0.5,0.6"), "error: hydra.sweep.subdir: 'x' is the same folder"),
    (("sweep", "hydra.sweep.dir=outputs", "baseline=magnitude", "pruning.sparsity=0.5,0.6"),
     "error: output_root: the dense runs its baselines start from go to"),
    (("train", "output_root=/proc/patcli"), "error: output_root: /proc/patcli"),
])
def test_cfg_checks_what_it_prints_as_the_run_would_and_makes_no_folder(cli, tmp_path, args, expected):
    code, out, err = cli(args[0], "--cfg", *args[1:])
    assert code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert out == "" and list(tmp_path.iterdir()) == []


def test_cfg_leaves_the_device_to_the_machine_that_runs_it(cli, tmp_path):
    """A config for a cluster's GPU, prepared on a laptop: --cfg shows it; running it here is refused."""
    code, out, _ = cli("train", "--cfg", "trainer.device=cuda")
    assert code == 0 and "device: cuda" in out
    code, _, err = cli("train", "trainer.device=cuda", "trainer.max_steps=2")
    assert code == 2 and err.startswith("error: trainer.device:")


def test_sweep_cfg_shows_its_first_job_and_lists_what_every_job_sets(cli, tmp_path):
    code, out, _ = cli("sweep", "--cfg", "pruning.sparsity=0.5,0.8", "scorer=magnitude,movement", "seed=3")
    assert code == 0 and list(tmp_path.iterdir()) == []
    config, listing = out.split("# the config of job 0 of 4, each checked; what each job sets:\n")
    assert "sparsity: 0.5" in config and "name: magnitude" in config and "seed: 3" in config
    assert listing.splitlines() == ["#   0: pruning.sparsity=0.5 scorer=magnitude", "#   1: pruning.sparsity=0.5 scorer=movement",
                                    "#   2: pruning.sparsity=0.8 scorer=magnitude", "#   3: pruning.sparsity=0.8 scorer=movement"]


def test_a_run_of_very_many_steps_is_checked_without_walking_them(cli, tmp_path):
    """The check listed every step's mask update: trainer.epochs=10**20 (a few zeros too many) never finished."""
    code, out, err = cli("train", "--cfg", f"trainer.epochs={10**20}")
    assert code == 0 and yaml.safe_load(out)["trainer"]["epochs"] == 10**20, err


def test_cfg_lines_wider_than_the_terminal_stay_whole_so_the_output_stays_yaml(cli, tmp_path):
    folder = "a_folder_name_long_enough_to_pass_the_width_a_console_wraps_lines_at_when_its_output_goes_to_a_pipe" * 2
    code, out, _ = cli("train", "--cfg", f"output_root={folder}")
    assert code == 0 and yaml.safe_load(out)["output_root"] == folder
    swept = [f"trainer.{key}={values}" for key, values in (("lr", "0.001,0.002"), ("weight_decay", "0.01,0.02"),
             ("batch_size", "32,64"), ("lr_schedule", "constant,cosine"), ("warmup_steps", "0,1"), ("max_steps", "3,4"), ("grad_clip", "1.5,2.5"))]
    code, out, _ = cli("sweep", "--cfg", *swept, f"output_root={folder}", "scorer=magnitude,movement")
    listing = out.split("what each job sets:\n")[1].splitlines()
    assert code == 0 and len(listing) == 256 and all(line.startswith("#   ") for line in listing)
    assert max(len(line) for line in listing) > 160 and yaml.safe_load(out)["output_root"] == folder


@pytest.mark.parametrize(
    "override, expected",
    [
        ("pruning.sparsity=1.5", "pruning.sparsity: 1.5 is out of range; allowed: 0.0 <= value < 1.0"),
        ("scorer=nope", "scorer=nope: unknown option; allowed: "),
        ("schedule.end=-3", "schedule.end: -3 is out of range"),
        ("foo=1", "foo: unknown key; allowed: "),
        ("trainer.foo=1", "trainer.foo: unknown key; allowed: trainer.epochs"),
        ("trainer.epochs=abc", "trainer.epochs: expected an integer"),
        ("schedule.end=5000", "schedule.end: step 5000 is after the run's last step"),
        ("trainer.optimizer=lion", "trainer.optimizer: 'lion' is not allowed; allowed: adamw, adam, sgd"),
        ("pruning.sparsity=0.5,0.9", "pruning.sparsity: 0.5,0.9 is several values; allowed: one value, or several runs "
         "with patcli sweep pruning.sparsity=0.5,0.9"),
        ("schedule.end=0.1 schedule.begin=0.5", "comes before schedule.begin (step "),
        ("trainer.lr=nan", "trainer.lr: nan is out of range; allowed: a finite number > 0"),
        ("trainer.weight_decay=-1", "trainer.weight_decay: -1.0 is out of range; allowed: a finite number >= 0"),
        ("trainer.momentum=-1", "trainer.momentum: -1.0 is out of range; allowed: 0 <= value < 1"),
        ("trainer.grad_clip=-1", "trainer.grad_clip: -1.0 is out of range; allowed: a finite number > 0, or null"),
        ("pruning=bogus", "pruning=bogus: unknown option; allowed: "),
        ("schedule.power=-1", "schedule.power: -1.0 is out of range; allowed: 0 < value < inf"),
        ("schedule.power=inf", "schedule.power: inf is out of range; allowed: 0 < value < inf"),  # was one-shot
        # runs, dense runs and sweeps went to the filesystem's root
        ("output_root=", "output_root: empty; allowed: a directory path"),
        ("pruning=filters", "pruning: Sequential has no filters to prune; allowed: pruning=neurons"),
        ("dataset=pysrc", "model: model=mlp classifies feature vectors; allowed for a language-modelling dataset: model=gpt"),
        ("prunin.sparsity=0.5", "prunin.sparsity: unknown key; allowed: model, dataset, trainer, pruning"),  # listed none
        ("trainer.lr.x=1", "trainer.lr.x: trainer.lr takes a value, not keys; allowed: trainer.lr=VALUE"),
        # nm chooses uniform allocation itself: the error blamed allocation, which the user never set
        ("regrowth=rigl schedule=constant pruning=nm", "regrowth: regrowth=rigl drops and regrows single weights; allowed "
                                                       "with pruning=unstructured (got pruning=nm)"),
        ("dataset.split_seed=-1", "dataset.split_seed: -1 is out of range; allowed: 0 <= value < 2**32"),  # a traceback
        ("regrowth=set schedule=constant regrowth.delta_t=100000", "regrowth.delta_t: 100000 steps reaches regrowth.end "
                                                                    "(step 30) before any update that drops weights"),
        # the one update at end drops a fraction of 0
        ("regrowth=set schedule=constant regrowth.delta_t=30", "regrowth.delta_t: 30 steps reaches regrowth.end (step 30)"),
        ("model.hidden=[100000000,100000000]", "model: cannot be built here (RuntimeError: "),
        ("trainer.threads=100000", "trainer.threads: 100000 is out of range; allowed: 1..1024 or null"),
        ("regularizer=lasso regularizer.lam=0", "regularizer.lam: 0.0 is out of range; allowed: a finite number > 0"),
        ("allocation=sensitivity allocation.trials=[0.5,1.5]", "allocation.trials: 1.5 is out of range"),
        ("allocation=erk allocation.power=-2", "allocation.power: -2.0 is out of range"),
        ("allocation=sensitivity allocation.batches=0", "allocation.batches: 0 is out of range; allowed: >= 1 or null"),
        ("model.name=cnn", "model.name: an option is chosen with model=cnn, not renamed; allowed: model=OPTION (cnn, custom, gpt, mlp)"),
        # ran blocks with none of their settings (pruning's option key is mode)
        ("pruning.mode=block", "pruning.mode: an option is chosen with pruning=block, not renamed; allowed: pruning=OPTION "
                               "(block, filters, heads, neurons, nm, none, unstructured)"),
        # a traceback from inside Hydra
        ("pruning=5", "pruning=5: not an option name; allowed: one of block, filters, heads, neurons, nm, none, unstructured "
                      "(several runs: patcli sweep pruning=a,b)"),
        ("scorer=null", "scorer=null: not an option name; allowed: one of activation, attention_entropy, gradient, "),
        # merged both files and ran the last option, or named a key of the first one
        ("scorer=[magnitude,random]", "scorer=[magnitude,random]: not an option name; allowed: one of activation, "),
        ("schedule=[agp,linear]", "schedule=[agp,linear]: not an option name; allowed: one of agp, alternating, "),
        ("schedule=", "schedule=: not an option name; allowed: one of agp, "),  # Hydra's message, no options
        # ran on a default its record lacked (scorer: null, for the magnitude it used)
        # the group check's own parse let Hydra's error out as a traceback
        ("trainer.lr=float(abc)", "trainer.lr: cannot parse 'trainer.lr=float(abc)': Error parsing override "
                                  "'trainer.lr=float(abc)' ValueError "),
        # "allowed: (none)"
        ("+scorer.foo=1", "scorer.foo: unknown key; scorer=magnitude takes no settings"),
        ("+pruning.foo=1", "pruning.foo: unknown key; allowed: pruning.sparsity, pruning.frequency, "),
        ("pruning=none +pruning.foo=1", "pruning.foo: unknown key; allowed: pruning.exclude, pruning.frequency, "),
        # "step -1 must be >= 0", while 0 was refused in turn
        ("schedule=alternating schedule.decompressed=-1", "schedule.decompressed: -1 is out of range; allowed: a step "
                                                          "count >= 1 or a fraction of the run > 0"),
        ("~pruning.sparsity", "~pruning.sparsity: a setting cannot be removed; allowed: pruning.sparsity=VALUE"),
        ("~scorer", "~scorer: a setting cannot be removed; allowed: scorer=OPTION (activation, attention_entropy, "),
        ("schedule=agp,linear", "schedule: agp,linear is several values; allowed: one option, or several runs with "
                                "patcli sweep schedule=agp,linear"),  # it suggested a list
        ("trainer.max_steps=20 trainer.warmup_steps=20", "trainer.warmup_steps: 20 is not below the run's 20 steps, so the "
                                                         "whole run would be warm-up; allowed: 0 to 19"),
        # it listed schedule.name, which is chosen with schedule=..., never set
        ("schedule=alternating schedule.end=0.5", "schedule.end: unknown key; allowed: schedule.begin, schedule.compressed"),
        ("scorer.foo=1", "scorer.foo: unknown key; scorer=magnitude takes no settings"),  # "allowed: scorer.name"
        # the list form it offered was refused in turn: "expected a number"
        ("trainer.lr=0.1,0.01", "trainer.lr: 0.1,0.01 is several values; allowed: one value, or several runs with patcli "
                                "sweep trainer.lr=0.1,0.01"),
        ("model.hidden=[32],[16]", "model.hidden: [32],[16] is several values; allowed: one list, e.g. model.hidden=[a,b], "
                                   "or several runs with patcli sweep model.hidden=[32],[16]"),
        # "Sweep parameters 'pruning.sparsity=range(1,3)' requires --multirun", a flag patcli does not have
        ("pruning.sparsity=range(1,3)", "pruning.sparsity: range(1,3) is a sweep; allowed: one value, or several runs with "
                                        "patcli sweep pruning.sparsity=range(1,3)"),
        # it ran, and recorded a reversal recipe in which no weight could return
        ("regrowth=reversal schedule=oneshot", "regrowth: reversal re-chooses the masks at each mask update after the "
                                               "first that prunes, and this run's schedule=oneshot prunes at 1 (steps "
                                               "0–0, frequency=50), so no pruned weight could return; allowed: more "
                                               "updates that prune (a later schedule end, a lower frequency or a longer "
                                               "run), or regrowth=none"),
        # an update at step 0 prunes nothing: one at step 30 is the only one that prunes
        ("regrowth=reversal trainer.optimizer=sgd", "regrowth: reversal re-chooses the masks at each mask update after "
                                                    "the first that prunes, and this run's schedule=agp prunes at 1 "
                                                    "(steps 0–30, frequency=50)"),
        ("trainer.lr=${foo}", "trainer.lr: cannot resolve its interpolation: Interpolation key 'foo' not found"),
        # it trained a dense run inside the run's own folder, found by no later run
        ("hydra.job.chdir=true", "hydra.job.chdir: true is not allowed: a run works from the directory patcli started in"),
        ("hydra.job.chdir=yes", "hydra.job.chdir: true is not allowed"),  # as Hydra reads it; off, no and 0 pass
        ("=0.9", "=0.9: an override needs a key; allowed: KEY=VALUE, e.g. pruning.sparsity=0.9"),  # a ValueError traceback
        # the parser's message named no override
        ("pruning.sparsity=0.5,", "pruning.sparsity: cannot parse 'pruning.sparsity=0.5,': mismatched input '<EOF>'"),
        ("model.hidden=[1,2", "model.hidden: cannot parse 'model.hidden=[1,2': no viable alternative at input '[1,2'"),
        ("schedule=alternating schedule.final=0.9 schedule.begin=0.5", "schedule.final: the final phase"),
        ("model._target_=torch.nn.Linear", "model._target_: unknown key; allowed: model.hidden, model.activation, "
         "model.dropout; for a model of your own: model=custom model._target_=package.Class"),
        ("seed=9223372036854775808", "seed: 9223372036854775808 is out of range; allowed: 0 <= seed < 2**63"),
        ("scorer=random scorer.seed=-1", "scorer.seed: -1 is out of range; allowed: 0 <= seed < 2**63"),
        ("allocation=erk allocation.power=inf", "allocation.power: inf is out of range; allowed: finite values >= 0"),
        ("pruning=nm pruning.max_layer_sparsity=0.3", "pruning.max_layer_sparsity: 0.3 is below the sparsity pruning=nm "
                                                      "gives every layer; allowed: 0.5 <= value < 1"),
        ("pruning=nm pruning.n=1 pruning.m=3 pruning.sparsity=0.6", "pruning.sparsity: pruning=nm fixes sparsity at "
                                                                    "0.666666666667; allowed: 0.666666666667 or null"),
        ("pruning=block pruning.cols=0", "pruning.cols: 0 is not allowed (block 1x0); allowed: sizes >= 1"),
        ("pruning=nm pruning.m=0", "pruning.m: 0 is not allowed; allowed: m >= 2"),  # it named pruning.n
        # a flag reached Hydra's parser: "cannot parse override: LexerNoViableAltException: --sparsity"
        ("--sparsity 0.9", "--sparsity: settings are Hydra overrides, key=value, not flags; allowed: e.g. pruning.sparsity=0.9"),
        ("pruning=nm pruning.n=4", "pruning.n: 4:4 is not allowed; allowed: 1 <= n < m"),
        ("schedule=oneshot +schedule.end=0.5", "schedule.end: unknown key; allowed: schedule.begin, schedule.initial_sparsity"),
        ("schedule=alternating schedule.ramp=linear schedule.power=2", "schedule.power: 2.0 is used only by ramp=agp; "
                                                                        "allowed with ramp=linear: 3.0 (the default)"),
        ("scorer=attention_entropy pruning=neurons", "pruning: scorer 'attention_entropy' scores attention heads; "
                                                     "allowed with pruning=heads"),
        # it said "allowed with pruning=neurons, filters or heads", and neurons were then refused in turn
        ("scorer=attention_entropy", "pruning: scorer 'attention_entropy' scores attention heads; allowed with pruning=heads"),
        ("pruning.exclude=[nope.weight]", "pruning.exclude: pattern 'nope.weight' matches no parameter of the model; "
                                          "allowed: fnmatch patterns over 1.weight, 1.bias, 3.weight, 3.bias, 5.weight, 5.bias"),
        ("pruning=none pruning.exclude=[nope.weight]", "pruning.exclude: pattern 'nope.weight' matches no parameter"),
        # "unknown key; allowed: ..., hydra.job.env_set, ..." and "unknown key; allowed: " (nothing)
        ("hydra.job.env_set={FOO:1}", "hydra.job.env_set: takes its keys one at a time; allowed: +hydra.job.env_set.KEY=VALUE"),
        ("hydra.job.env_set.FOO=1", "hydra.job.env_set.FOO: unknown key; hydra.job.env_set has none yet, a new one is added "
                                    "with a plus: +hydra.job.env_set.FOO=1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_directory(cli, tmp_path, override, expected):
    code, out, err = cli("train", *TINY, *override.split())
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "outputs").exists()


def test_a_device_this_machine_lacks_fails_before_any_run_or_sweep_directory_exists(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["train"], ["sweep", "seed=0,1"]):
        code, _, err = cli(*command, *TINY, "trainer.device=cuda", "hydra.run.dir=run", "hydra.sweep.dir=sweep")
        assert code == 2 and err.startswith("error: trainer.device: cuda was asked for but no CUDA device is available")
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_a_run_or_sweep_directory_that_cannot_be_made_is_a_one_line_error(cli, tmp_path):
    (tmp_path / "a-file").write_text("")
    for command, override, key in ((["train"], "hydra.run.dir=a-file", "hydra.run.dir"),
                                   (["train"], "output_root=a-file/outputs", "output_root"),
                                   (["sweep", "seed=0,1"], "hydra.sweep.dir=a-file", "hydra.sweep.dir")):
        code, out, err = cli(*command, *TINY, override)
        assert code == 2 and err.startswith(f"error: {key}: ") and "a-file is a file" in err, err
        assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_directory_that_holds_a_run_or_sweep_is_never_overwritten(cli, tmp_path):
    code, out, _ = cli("train", *TINY, "hydra.run.dir=run")
    assert code == 0
    code, out, _ = cli("sweep", *TINY, "model.hidden=[16]", "hydra.sweep.dir=sweep")
    assert code == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for command, override, why in (
        (["train"], "hydra.run.dir=run", "run already holds a run (result.json)"),
        (["train"], "hydra.run.dir=sweep/0", "sweep/0 already holds a run (result.json)"),
        (["sweep"], "hydra.sweep.dir=sweep", "sweep already holds a sweep (multirun.yaml)"),
        (["train"], "hydra.run.dir=", "hydra.run.dir: empty; allowed: a directory path"),
        (["sweep"], "hydra.sweep.dir=", "hydra.sweep.dir: empty; allowed: a directory path"),
    ):
        code, _, err = cli(*command, *TINY, override)
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_run_or_sweep_inside_a_runs_folder_is_refused(cli, tmp_path):
    """A run written into another's export/ was deleted by the next `patcli export` of that run, and runs nested in a
    run's folder were read by `compare` of that folder as its repeats."""
    code, out, err = cli("train", *TINY, "hydra.run.dir=run")
    assert code == 0, err
    code, out, err = cli("export", "run", "--no-latency")
    assert code == 0, err
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for command, override, key in ((["train"], "hydra.run.dir=run/export", "hydra.run.dir"),
                                   (["train"], "hydra.run.dir=run/nested/deeper", "hydra.run.dir"),
                                   (["sweep", "seed=0,1"], "hydra.sweep.dir=run/sub", "hydra.sweep.dir")):
        code, _, err = cli(*command, *TINY, override)
        nested = override.split("=", 1)[1]
        assert code == 2 and err.strip() == (f"error: {key}: {nested} lies inside the run {tmp_path}/run (result.json); "
                                             "allowed: a directory outside it"), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "project").mkdir()  # a result.json of another tool's is no run
    (tmp_path / "project" / "result.json").write_text('{"accuracy": 0.9}')
    code, _, err = cli("train", *TINY, "hydra.run.dir=project/run")
    assert code == 0, err
    (tmp_path / "run" / "export" / "notes.txt").write_text("mine")  # a folder holding more than an export keeps it
    code, _, err = cli("export", "run", "--no-latency")
    assert code == 0 and (tmp_path / "run" / "export" / "notes.txt").read_text() == "mine", err
    assert sorted(p.name for p in (tmp_path / "run" / "export").iterdir()) == ["compressed.safetensors", "model.json", "notes.txt"]


def test_a_run_directory_another_run_takes_while_this_one_is_checked_is_refused(cli, tmp_path, monkeypatch):
    """Both runs passed the folder check; the second then merged its metrics into the first's and replaced its files."""
    from patcli import hydra_app

    check_device = hydra_app.check_device_here

    def other_run_starts(config):  # while this run is checked, another into the same folder gets there first
        (tmp_path / "run" / ".hydra").mkdir(parents=True)
        (tmp_path / "run" / "metrics.jsonl").write_text("the other run's\n")
        check_device(config)

    monkeypatch.setattr(hydra_app, "check_device_here", other_run_starts)
    code, out, err = cli("train", *TINY, "hydra.run.dir=run")
    assert code == 2 and err.strip() == (f"error: hydra.run.dir: {tmp_path}/run was taken by another run started at the "
                                         "same time; allowed: a directory no run uses"), err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "metrics.jsonl"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "the other run's\n"


@pytest.mark.parametrize("subdir", ["meta/hydra", ".", "meta"])
def test_a_hydra_output_subdir_nested_or_the_run_folder_itself_still_holds_the_runs_config(cli, tmp_path, subdir):
    (tmp_path / "run" / "meta").mkdir(parents=True)  # a folder of one's own: no run's ("taken by another run", it said)
    code, out, err = cli("train", *TINY, "hydra.run.dir=run", f"hydra.output_subdir={subdir}")
    assert code == 0, err
    assert {"config.yaml", "hydra.yaml", "overrides.yaml"} <= {p.name for p in (tmp_path / "run" / subdir).iterdir()}


@pytest.mark.parametrize("stop, exit_code", [(KeyboardInterrupt(), 130), (OSError(27, "File too large"), 1)],
                         ids=["ctrl-c", "disk full"])
def test_a_run_that_stops_before_it_begins_gives_its_folder_back(cli, tmp_path, monkeypatch, stop, exit_code):
    """Ctrl-C while Hydra set the run up left .hydra behind, and a retry into the folder was refused as a run's; a disk
    too full for Hydra's own snapshot ended in a traceback, with the same leftover."""
    from hydra._internal.hydra import Hydra

    run = Hydra.run

    def stops(self, config_name, task_function, overrides, *args, **kwargs):
        snapshot = Path(next(o for o in overrides if o.startswith("hydra.run.dir=")).split("=", 1)[1].strip("'")) / ".hydra"
        (snapshot / "hydra.yaml").write_text("hydra:\n  run:\n")  # Hydra's own file, cut short
        stop.filename = str(snapshot / "hydra.yaml")
        raise stop

    monkeypatch.setattr(Hydra, "run", stops)
    code, _, err = cli("train", *TINY, "hydra.run.dir=run")
    said = "error: interrupted" if exit_code == 130 else f"error: cannot write {tmp_path}/run/.hydra/hydra.yaml: File too large"
    assert code == exit_code and err.startswith(said) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(Hydra, "run", run)
    code, out, err = cli("train", *TINY, "hydra.run.dir=run")
    assert code == 0 and result_of(tmp_path / "run")["status"] == "ok", err


def test_a_run_folder_whose_name_ends_in_a_backslash_runs(cli, tmp_path):
    """Pinned for Hydra in quotes, its last backslash escaped the closing quote: the override could not be parsed."""
    code, out, err = cli("train", *TINY, r"hydra.run.dir='r r\\'")  # Hydra reads the folder r r\
    assert code == 0, err
    assert (tmp_path / "r r\\" / "result.json").is_file()


def test_regrowth_or_a_regularizer_given_to_a_dense_run_is_warned_unused_not_refused(cli, tmp_path, caplog):
    """A sweep over pruning=none,unstructured with regrowth=rigl was refused over a pair the dense run never uses."""
    code, out, err = cli("train", *TINY, "pruning=none", "regrowth=rigl", "hydra.run.dir=run")
    assert code == 0, err
    assert "pruning=none trains dense: schedule=constant, regrowth=rigl do not apply" in out + err + caplog.text


def test_a_long_or_unreadable_path_is_a_one_line_error_naming_its_key(cli, tmp_path):
    """pathlib's is_file() raised 'File name too long' (and PermissionError under a folder it may not read)."""
    long = "a" * 300
    for command, override, key in ((["train", *TINY], f"trainer.init_from={long}", "trainer.init_from"),
                                   (["train", "dataset=text", "model=gpt"], f"dataset.path={long}", "dataset.path"),
                                   (["train", *TINY], f"hydra.run.dir={long}", "hydra.run.dir"),
                                   (["prune-post", *TINY, "baseline=magnitude"], f"dense={long}", "dense")):
        code, out, err = cli(*command, override)
        assert code == 2 and err.startswith(f"error: {key}: ") and len(err.strip().splitlines()) == 1, err
    assert "has a name of 300 bytes" in cli("train", *TINY, f"hydra.run.dir=x/{long}")[2]
    assert list(tmp_path.iterdir()) == []


def test_a_bad_dense_reference_stops_a_training_run_or_sweep_before_it_trains(cli, tmp_path):
    for command in (["train", "hydra.run.dir=run"], ["sweep", "seed=0,1", "hydra.sweep.dir=sweep"]):
        code, _, err = cli(*command, *TINY, f"dense={tmp_path}/missing")
        assert code == 2 and err.startswith(f"error: dense: {tmp_path}/missing is not a directory"), err
        assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_preset_outside_a_sweep_is_a_one_line_error(cli, tmp_path):
    """Its settings are a sweeper's: a single run would ignore them and train the default for minutes."""
    for command in ("train", "prune-post"):
        code, _, err = cli(command, "+experiment=pat_vs_post")
        assert code == 2 and err.strip() == "error: experiment: +experiment=pat_vs_post is a sweep preset; allowed: patcli sweep +experiment=pat_vs_post"
    code, _, err = cli("sweep", "experiment=pat_vs_post")
    assert code == 2 and err.strip() == ("error: experiment: a preset is added with a plus; allowed: patcli sweep "
                                         "+experiment=NAME (pat_vs_post, tune_schedule)")
    assert list(tmp_path.iterdir()) == []


def test_a_model_of_ones_own_gets_exactly_the_keys_given(cli, tmp_path):
    code, out, err = cli("train", "model=custom", "model._target_=torch.nn.Linear", "+model.in_features=64",
                         "+model.out_features=10", "trainer.epochs=2", "pruning.sparsity=0.5", f"hydra.run.dir={tmp_path}/run")
    assert code == 0, err
    record = result_of(tmp_path / "run")
    assert record["model"] == "Linear" and record["params_prunable"] == 640
    assert record["achieved_sparsity"] == pytest.approx(0.5, abs=1 / 640)
    assert record["config"]["model"] == {"_target_": "torch.nn.Linear", "in_features": 64, "out_features": 10}
    code, _, err = cli("train", "model=custom")
    assert code == 2 and err.startswith("error: model._target_: missing; allowed: the dotted path of a class"), err
    linear = ["model=custom", "model._target_=torch.nn.Linear", "trainer.epochs=1", "hydra.run.dir=wrong"]
    for sizes, why in ((["+model.in_features=32", "+model.out_features=10"], "mat1 and mat2 shapes cannot be multiplied"),
                       (["+model.in_features=64", "+model.out_features=3"], "Target 9 is out of bounds"),
                       (["+model.in_features=64", "+model.out_features=9", "dataset.split_seed=1"],  # first targets 4, 1
                        "it gives 9 scores per sample for 10 classes")):
        code, _, err = cli("train", *linear, *sizes)  # caught before training, not at its first step
        assert code == 2 and err.startswith("error: model: does not fit dataset=digits") and why in err, err
        assert "allowed: a model for input_shape=[64], num_classes=10" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "wrong").exists()
    code, _, err = cli("train", *linear[:-1], "+model.in_features=64", "+model.out_features=12", "hydra.run.dir=padded")
    assert code == 0 and "the model gives 12 scores per sample for the 10 classes" in (tmp_path / "padded" / "run.log").read_text()
    code, _, err = cli("train", *linear, "+model.in_features=64")  # the class's own multi-line message, on one line
    assert code == 2 and "missing 1 required positional argument: 'out_features'" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_records_the_run_as_interrupted_and_exits_130(cli, tmp_path, monkeypatch):
    from patcli import jobs

    def interrupted(config, run_dir, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "execute", interrupted)
    code, _, err = cli("train", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 130 and err.strip() == "error: interrupted (a run already started is recorded in its result.json with status 'interrupted')"
    assert result_of(tmp_path / "run")["status"] == "interrupted"


def test_an_interrupted_runs_record_says_how_far_it_got_from_its_metrics(tmp_path):
    """It said 0 steps and sparsity 0, although metrics.jsonl showed 50 steps done and a mask update to 0.6."""
    from patcli.runner import failed_record

    rows = [{"kind": "mask_update", "step": 25, "sparsity": 0.3, "target": 0.3}, {"kind": "eval", "step": 40, "val_accuracy": 0.5},
            {"kind": "mask_update", "step": 50, "sparsity": 0.6, "target": 0.6}, {"kind": "eval", "step": 50}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"kind": "ev')  # cut short
    record = failed_record({"pruning": {"sparsity": 0.9}}, tmp_path, KeyboardInterrupt(), status="interrupted")
    assert (record.status, record.train_steps, record.total_train_steps) == ("interrupted", 50, 50)
    assert record.achieved_sparsity == 0.6 and record.mask_updates == 2  # it said 0 updates
    assert result_of(tmp_path)["train_steps"] == 50


def test_a_failed_runs_record_names_its_model_as_a_finished_one_does(tmp_path):
    """A model of one's own was recorded as "?" (its config has a _target_, not a name), so its failed rows in
    compare's csv said "?"."""
    from patcli.runner import failed_record

    source = {"model": {"_target_": "user_models.TinyNet", "width": 8}, "pruning": {"sparsity": 0.9}}
    record = failed_record(source, tmp_path, RuntimeError("boom"))
    assert record.model == "TinyNet" and record.status == "failed"


def test_sigterm_records_the_run_as_interrupted_and_exits_143(cli, tmp_path, monkeypatch):
    """timeout, SLURM and torchrun's agent stop a job with SIGTERM: the run must still leave its record."""
    import os
    import signal

    from patcli import jobs

    def terminated(config, run_dir, progress=None):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(jobs, "execute", terminated)
    code, _, err = cli("train", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 143 and err.strip().startswith("error: interrupted")
    assert result_of(tmp_path / "run")["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives for the command only


def test_the_cli_runs_from_a_thread_other_than_the_main_one(tmp_path, monkeypatch):
    """Only the main thread may set the SIGTERM handler: elsewhere the command runs without it."""
    import threading

    from typer.testing import CliRunner

    from patcli.cli import app

    monkeypatch.chdir(tmp_path)
    results = []
    worker = threading.Thread(target=lambda: results.append(CliRunner().invoke(app, ["train", "--cfg"])))
    worker.start()
    worker.join(timeout=60)
    assert results[0].exit_code == 0, results[0].output
    assert "sparsity:" in results[0].stdout


def test_torchrun_is_refused_before_any_process_writes_a_run(cli, tmp_path, monkeypatch):
    """Every process torchrun starts would run the whole job and write its own record."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli("train", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "WORLD_SIZE=2 (torchrun) would run it in every process; allowed: run patcli without torchrun" in err
    assert not (tmp_path / "run").exists()


def test_several_paths_given_to_a_single_run_are_shown_as_given(cli, tmp_path):
    code, _, err = cli("train", *TINY, "dense=/tmp/a,/tmp/b")
    assert code == 2 and err.strip() == ("error: dense: /tmp/a,/tmp/b is several values; allowed: one path (a name with a "
                                         "comma quoted: dense='/tmp/a,/tmp/b'), or several runs with patcli sweep dense=/tmp/a,/tmp/b")
    code, _, err = cli("train", *TINY, "dataset.path=a,b.txt")  # it offered each half made absolute on its own
    assert code == 2 and err.strip() == ("error: dataset.path: a,b.txt is several values; allowed: one path (a name with a "
                                         "comma quoted: dataset.path='a,b.txt'), or several runs with patcli sweep "
                                         "dataset.path=a,b.txt")


def test_a_quoted_or_home_relative_path_is_saved_absolute(cli, tmp_path, monkeypatch):
    """export rebuilds a run from its saved config, from any directory: every path in it must be absolute."""
    from patcli.hydra_app import absolute_paths

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_paths(["dataset.path='my data.txt'", "dense=~/runs/d", 'trainer.init_from="a,b"', "dense='${oc.env:D}'"]) == [
        f"dataset.path='{tmp_path}/my data.txt'", f"dense='{tmp_path}/home/runs/d'", f"trainer.init_from='{tmp_path}/a,b'",
        "dense='${oc.env:D}'"]  # an interpolation is left to Hydra
    # a comma escaped for Hydra is part of the name: each half was made absolute on its own, then refused as two paths
    assert absolute_paths(["dataset.path=x\\,y.txt", "dense=a\\,b,c"]) == [f"dataset.path='{tmp_path}/x,y.txt'",
                                                                        f"dense='{tmp_path}/a,b','{tmp_path}/c'"]
    code, _, err = cli("train", "--cfg", "model=gpt", "dataset=text", "dataset.path=x\\,y.txt")
    assert code == 2 and err.startswith(f"error: dataset.path: {tmp_path}/x,y.txt is not a file;"), err


def test_a_hydra_error_without_a_message_is_named_by_its_type():
    from hydra.errors import ConfigCompositionException

    from patcli.hydra_app import translate_hydra_error

    assert str(translate_hydra_error(ConfigCompositionException(""), [])) == "ConfigCompositionException"


def test_an_output_root_with_a_space_and_a_non_ascii_letter_works_unquoted(cli, tmp_path):
    code, out, err = cli("train", *TINY, "trainer.max_steps=3", f"output_root={tmp_path}/o ü sp")
    assert code == 0, err
    assert run_dir_of(out).parent.parent.parent == tmp_path / "o ü sp"


def test_a_diverged_run_is_one_line_exit_1_and_recorded_as_failed(cli, tmp_path):
    """A NaN loss must not end as a run recorded ok, with 10% accuracy and no weight pruned."""
    code, _, err = cli("train", *TINY[:2], "trainer.lr=1e6", "pruning.frequency=5", f"hydra.run.dir={tmp_path}/run")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    # whichever sees it first: a mask update's NaN scores, or the validation loss
    assert err.startswith(("error: pruning scores of ", "error: training diverged: validation loss is nan")), err
    assert "lower the learning rate" in err or "lower trainer.lr" in err
    record = result_of(tmp_path / "run")
    assert record["status"] == "failed" and "FloatingPointError" in record["error"]


def test_a_diverged_loss_is_null_in_metrics_jsonl_which_strict_json_readers_take(cli, tmp_path):
    """It was written as NaN: JSON has none, so jq turned it into null silently and a browser's JSON.parse failed."""
    code, _, _ = cli("train", *TINY[:2], "pruning=none", "trainer.optimizer=sgd", "trainer.lr=1e8", f"hydra.run.dir={tmp_path}/run")
    assert code == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}")) for line in lines]
    assert any(row["kind"] == "eval" and row["loss"] is None for row in rows), rows


def test_console_script_runs_in_a_fresh_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "patcli", "train", *TINY, "trainer.max_steps=5", "schedule.end=3", "pruning.sparsity=0.5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result_of(run_dir_of(result.stdout))["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_trainer_builds_the_configured_optimizer_with_its_fused_kernel(name, cls):
    from torch import nn

    from patcli.config import TrainerConfig
    from patcli.training import make_optimizer

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)  # frozen parameters are left out
    optimizer = make_optimizer(model, TrainerConfig(optimizer=name, lr=0.02, weight_decay=0.3, momentum=0.7))
    assert type(optimizer) is cls and optimizer.defaults["fused"] is True
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.02 and group["weight_decay"] == 0.3 and len(group["params"]) == 3
    if name == "sgd":
        assert group["momentum"] == 0.7


def test_a_fixed_pattern_warns_that_a_chosen_allocation_does_not_apply(cli, caplog):
    code, out, err = cli("train", *TINY, "trainer.max_steps=4", "pruning=nm", "allocation=lamp")
    assert code == 0, err
    assert "pruning=nm prunes every layer to 0.5: allocation=lamp does not apply (uniform)" in out + err + caplog.text
    assert result_of(run_dir_of(out))["per_layer_sparsity"] == {"1.weight": 0.5, "3.weight": 0.5, "5.weight": 0.5}



@pytest.mark.parametrize("overrides, warning", [
    (["schedule=alternating", "pruning.frequency=10"],
     "pruning.frequency=10 does not apply: schedule=alternating updates masks where its compressed phases start"),
    (["pruning=neurons", "scorer=taylor", "pruning.reduce=l1"],
     "pruning.reduce=l1 does not apply: scorer=taylor scores whole channels itself"),
    # these wrote byte-identical weights without a word, and compare kept them apart
    (["pruning=neurons", "scorer=movement", "pruning.reduce=l1"],
     "pruning.reduce=l1 does not apply: scorer=movement sums its signed scores over each channel"),
    (["schedule=oneshot", "pruning.frequency=10"],
     "pruning.frequency=10 does not apply: schedule=oneshot prunes once, at schedule.begin"),
    (["schedule=constant", "pruning.frequency=10"],
     "pruning.frequency=10 does not apply: schedule=constant prunes to the target at schedule.begin, and its later "
     "updates change nothing without regrowth=reversal or a regularizer"),
    (["schedule=constant", "schedule.end=0.5"],
     "schedule.end=0.5 does not apply: schedule=constant prunes to the target at schedule.begin"),
    (["schedule=constant", "schedule.initial_sparsity=0.5"],
     "schedule.initial_sparsity=0.5 does not apply: schedule=constant holds the final sparsity from schedule.begin on"),
    (["schedule=alternating", "schedule.ramp=constant", "schedule.initial_sparsity=0.5"],
     "schedule.initial_sparsity=0.5 does not apply: schedule.ramp=constant holds the final sparsity from schedule.begin on"),
    (["regrowth=rigl", "regrowth.delta_t=5", "pruning.frequency=10"],
     "pruning.frequency=10 does not apply: regrowth=rigl is sparse at the target from the first step and updates masks "
     "every regrowth.delta_t steps until regrowth.end"),
    (["regrowth=set", "regrowth.delta_t=5", "schedule.begin=5"], "schedule.begin=5 does not apply: regrowth=set is sparse"),
])
def test_a_setting_the_other_choices_override_is_warned_unused(cli, caplog, overrides, warning):
    code, out, err = cli("train", *TINY, "trainer.max_steps=20", *overrides)
    assert code == 0, err
    assert warning in out + err + caplog.text
    assert warning.split("=")[0] in result_of(run_dir_of(out))["extra"]["inert"]  # compare pools across it
    code, out, err = cli("train", *TINY, "trainer.max_steps=20", *overrides[:-1])  # the default: no word
    assert code == 0, err
    assert "does not apply" not in out + err + caplog.text.replace(warning, "")


def test_a_schedule_end_that_a_later_begin_needs_is_pooled_but_not_called_moot(cli, caplog):
    """schedule.begin=0.9 needs an end after it (the default 0.75 is refused): saying the end does not apply would
    contradict that refusal. It is still the same recipe whatever end it names."""
    code, out, err = cli("train", *TINY, "trainer.max_steps=20", "schedule=constant", "schedule.begin=0.9",
                         "schedule.end=0.95")
    assert code == 0, err
    assert "does not apply" not in out + err + caplog.text
    assert "schedule.end" in result_of(run_dir_of(out))["extra"]["inert"]


@pytest.mark.parametrize("overrides", [
    ["schedule=constant", "regrowth=reversal", "trainer.optimizer=sgd"],  # later updates re-choose the kept weights
    ["schedule=constant", "regularizer=lasso"],  # updates mask what the penalty zeroed; it closes at schedule.end
    # whole neurons fall short of 0.7 at the first update (0.699); a later one prunes one more
    ["schedule=constant", "pruning=neurons", "pruning.sparsity=0.7"],
])
def test_a_constant_schedule_whose_later_updates_act_warns_of_nothing(cli, caplog, overrides):
    """Its pruning.frequency and schedule.end decide when the later updates come: not inert."""
    code, out, err = cli("train", *TINY, "trainer.max_steps=20", *overrides, "pruning.frequency=10", "schedule.end=0.5")
    assert code == 0, err
    assert "does not apply" not in out + err + caplog.text
    inert = result_of(run_dir_of(out))["extra"].get("inert", [])
    assert not {"pruning.frequency", "schedule.end"} & set(inert), inert
    # reversal keeps dense weights aside whatever pruning.masking says: a run given either is the same recipe
    assert ("pruning.masking" in inert) == ("regrowth=reversal" in overrides)

def test_a_dense_run_warns_that_the_pruning_options_it_was_given_do_not_apply(cli, caplog):
    code, out, err = cli("train", *TINY, "trainer.max_steps=4", "pruning=none", "scorer=movement", "schedule=cubic",
                         "regrowth=reversal")
    assert code == 0, err
    said = out + err + caplog.text
    assert "pruning=none trains dense: scorer=movement, schedule=cubic, regrowth=reversal do not apply" in said
    assert "reversal is meant for SGD" not in said
    assert result_of(run_dir_of(out))["method"] == "dense"
    caplog.clear()
    code, out, err = cli("train", *TINY, "trainer.max_steps=4", "pruning=none")
    assert code == 0, err
    assert "trains dense" not in out + err + caplog.text


def test_the_dense_reference_of_a_baseline_records_the_default_pruning_groups(cli, tmp_path, caplog):
    from omegaconf import OmegaConf

    from patcli.hydra_app import pruning_defaults

    code, out, err = cli("prune-post", *TINY, "baseline=pat_from_dense", "pruning.sparsity=0.5", "scorer=movement",
                         "schedule=cubic", "allocation=lamp", "regrowth=reversal", "trainer.optimizer=sgd",
                         "pruning.frequency=2")  # updates that prune after the first, for reversal to revive at
    assert code == 0, err
    assert "does not apply" not in out + err + caplog.text
    (dense,) = [d for d in (tmp_path / "outputs" / "dense").iterdir() if d.is_dir()]
    snapshot = OmegaConf.to_container(OmegaConf.load(dense / ".hydra" / "config.yaml"))
    assert {group: snapshot[group] for group in pruning_defaults()} == pruning_defaults()
    assert pruning_defaults()["schedule"] == {"name": "agp", "begin": 0, "end": 0.75, "initial_sparsity": 0.0, "power": 3.0}
    assert result_of(run_dir_of(out))["config"]["scorer"]["name"] == "movement"


def test_a_ramp_with_too_few_mask_updates_is_called_one_shot(cli, caplog):
    code, out, err = cli("train", *TINY)  # 40 steps, AGP until step 30, an update every 50 steps: one jump
    assert code == 0, err
    # numbered as metrics.jsonl numbers the update: 31 optimizer steps done
    rows = [json.loads(line) for line in (run_dir_of(out) / "metrics.jsonl").read_text().splitlines()]
    jumps = [row["step"] for row in rows if row["kind"] == "mask_update" and row["sparsity"] > 0]
    assert jumps == [31]
    assert "schedule=agp reaches 0.9 sparsity in one jump at step 31" in out + err + caplog.text
    assert "lower pruning.frequency or train longer" in out + err + caplog.text
    caplog.clear()
    code, out, err = cli("train", *TINY, "pruning.frequency=5")
    assert code == 0, err
    assert "one jump" not in out + err + caplog.text
    code, out, err = cli("train", *TINY, "schedule.begin=10", "schedule.end=10")
    assert code == 0, err
    assert "one jump at step 11" in out + err + caplog.text and "schedule.end equals schedule.begin" in out + err + caplog.text
    caplog.clear()  # a penalty chooses what to zero at each update, with no ramp of targets to jump along
    code, out, err = cli("train", *TINY, "pruning=neurons", "regularizer=group_lasso")
    assert code == 0, err
    assert "one jump" not in out + err + caplog.text
    # ... unless it closes with a cut to its own target, made at once when the schedule ends where it begins
    code, out, err = cli("train", *TINY, "regularizer=lasso", "regularizer.target=0.7", "schedule.begin=10", "schedule.end=10")
    assert code == 0, err
    assert "schedule=agp reaches 0.7 sparsity in one jump at step 11" in out + err + caplog.text


def test_digits_folds_partition_the_non_test_images_and_never_move_the_test_split():
    def rows(split):
        return {tuple(row.tolist()) for row in split.inputs}

    default = load_dataset(NamedConfig("digits", {}))
    folds = [load_dataset(NamedConfig("digits", {"val_fold": i})) for i in range(8)]
    val_sets = [rows(bundle.val) for bundle in folds]
    non_test = rows(default.train) | rows(default.val)
    assert all(torch.equal(bundle.test.inputs, default.test.inputs) for bundle in folds)
    assert sum(len(bundle.val) for bundle in folds) == 1437 and set().union(*val_sets) == non_test
    assert all(not (a & b) for i, a in enumerate(val_sets) for b in val_sets[i + 1:])
    assert all(len(bundle.train) + len(bundle.val) == 1437 and not rows(bundle.train) & rows(bundle.val) for bundle in folds)
    assert all(torch.bincount(bundle.val.targets, minlength=10).min() >= 17 for bundle in folds)  # stratified


def test_a_digits_fold_out_of_range_is_a_one_line_error(cli, tmp_path):
    code, out, err = cli("train", *TINY, "dataset.val_fold=8")
    assert code == 2 and "dataset.val_fold: 8 is out of range; allowed: null or 0..7" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


def test_folds_pool_in_compare_apart_from_fixed_split_runs_and_each_fold_gets_its_own_dense_run(cli, tmp_path):
    for fold in (0, 1, None):
        chosen = [f"dataset.val_fold={fold}"] if fold is not None else []
        code, out, err = cli("prune-post", *TINY, "baseline=magnitude", "pruning.sparsity=0.5", *chosen)
        assert code == 0, err
    dense_runs = sorted(d for d in (tmp_path / "outputs" / "dense").iterdir() if d.is_dir())
    assert len(dense_runs) == 3  # fold 1's baseline must not prune a model trained on fold 1's validation images
    assert {result_of(d)["config"]["dataset"]["val_fold"] for d in dense_runs} == {0, 1, None}
    code, out, err = cli("compare", "outputs", "--split", "val", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert len({row["config_hash"] for row in rows}) == 1  # one table: folds are the same model and dataset
    baselines = {row["row"]: row["n"] for row in rows if row["method"] == "post:magnitude"}
    # the folds pool into one row; the fixed split's run (whose validation images the folds overlap) stays apart
    assert baselines == {"post:magnitude [cross_validation=True]": 2, "post:magnitude [cross_validation=False]": 1}


def test_a_run_of_another_fold_cannot_be_built_on(cli, tmp_path):
    code, out, err = cli("train", *TINY, "pruning=none", "dataset.val_fold=0")
    assert code == 0, err
    fold_0 = run_dir_of(out)
    for other in (["dataset.val_fold=5"], []):
        for given in (f"trainer.init_from={fold_0}", f"dense={fold_0}"):
            command = "prune-post" if given.startswith("dense") else "train"
            code, out, err = cli(command, *TINY, "baseline=magnitude" if command == "prune-post" else "pruning.sparsity=0.5",
                                 given, *other)
            fold = other[0].split("=")[1] if other else "null"
            assert code == 2, (given, other)
            assert f"was trained with dataset.val_fold=0, this run uses {fold}" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude", f"dense={fold_0}", "dataset.val_fold=0")
    assert code == 0, err


def test_a_fold_needs_folds_that_hold_every_digit(cli, tmp_path):
    code, out, err = cli("train", *TINY, "dataset.val_fold=0", "dataset.val_size=10")
    assert code == 2 and "dataset.val_size: 10 is too small for cross-validation folds that hold every digit" in err


def test_the_fold_leaves_the_model_dataset_hash_of_older_runs_unchanged():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from patcli.config import parse_run_config
    from patcli.hydra_app import conf_dir

    def config(*overrides):
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", list(overrides))
        return parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))

    default, fold = config(), config("dataset.val_fold=3")
    # the hash and dense key of the default config computed by patcli before folds existed (commit b2e46b4)
    assert default.model_dataset_hash() == fold.model_dataset_hash() == "9571b9344bc8"
    assert default.dense_key() == "111b70191749" != fold.dense_key()
    # evaluating every 5 epochs trains the same weights: the dense run of the default serves it (it trained another)
    assert config("trainer.eval_every=5").dense_key() == "111b70191749" != config("trainer.epochs=61").dense_key()


def test_how_often_a_run_is_evaluated_leaves_its_weights_the_same(cli, tmp_path):
    """What lets the dense key ignore trainer.eval_every: evaluation draws nothing from the training's random streams."""
    from safetensors.torch import load_file

    weights = []
    for every in (1, 3):
        code, _, err = cli("train", *TINY, "trainer.epochs=3", "model.dropout=0.2", f"trainer.eval_every={every}",
                           f"hydra.run.dir={tmp_path}/every{every}")
        assert code == 0, err
        weights.append(load_file(tmp_path / f"every{every}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_trainer_threads_hold_for_their_run_only(cli, tmp_path, monkeypatch, request):
    """The count changes floating-point sums: a later job in the same process must not inherit it."""
    from patcli.runner import torch_threads
    from patcli.training import Trainer

    fit, during = Trainer.fit, []

    def counting_fit(self, *args, **kwargs):
        during.append(torch.get_num_threads())
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    request.addfinalizer(lambda count=torch.get_num_threads(): torch.set_num_threads(count))  # for the tests after this one
    torch.set_num_threads(2)
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with torch_threads(None):
        assert torch.get_num_threads() == 2
    code, _, err = cli("train", *TINY, "trainer.threads=1", "hydra.run.dir=run")  # a run restores it too
    assert code == 0 and during == [1] and torch.get_num_threads() == 2, err


def test_a_run_that_did_not_finish_cannot_be_trained_on_and_is_recorded_as_it_was_asked(cli, tmp_path, monkeypatch):
    from patcli.training import Trainer

    def broken_fit(self, *args, **kwargs):
        raise RuntimeError("stopped on purpose")

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="stopped on purpose"):  # not a user mistake: its traceback is shown
        cli("train", *TINY, "pruning=nm", "hydra.run.dir=nm")
    record = result_of(tmp_path / "nm")
    assert record["status"] == "failed" and record["target_sparsity"] == 0.5 and record["method"] == "pat"
    monkeypatch.setattr(Trainer, "fit", fit)
    (tmp_path / "nm" / "model.safetensors").write_bytes(b"")  # as an interrupted run may leave one
    code, _, err = cli("train", *TINY, "trainer.init_from=nm", "hydra.run.dir=next")
    assert code == 2 and err.strip() == f"error: trainer.init_from: {tmp_path}/nm is a failed run; allowed: a run that finished ok"


def test_a_dense_run_continued_from_another_is_neither_the_baselines_reference_nor_pooled_with_it(cli, tmp_path):
    code, _, err = cli("train", *TINY, "pruning=none", "hydra.run.dir=outputs/runs/a")
    assert code == 0, err
    code, _, err = cli("train", *TINY, "pruning=none", "trainer.init_from=outputs/runs/a", "hydra.run.dir=outputs/runs/b")
    assert code == 0, err
    assert result_of(tmp_path / "outputs/runs/b")["recipe"] == "dense+init"
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude", "pruning.sparsity=0.5")
    assert code == 0, err
    assert result_of(run_dir_of(out))["dense_reference"]["run_dir"] == str(tmp_path / "outputs/runs/a")
    code, out, err = cli("compare", "outputs", "--format", "csv")
    assert code == 0, err
    rows = [line.split(",") for line in out.splitlines()[1:]]
    assert sorted((r[4], r[11]) for r in rows) == [("dense", "1"), ("dense+init", "1"), ("post:magnitude", "1")]


def test_an_eval_row_gives_the_learning_rate_its_last_step_used(cli, tmp_path):
    code, _, err = cli("train", *TINY, "trainer.lr_schedule=linear", "trainer.max_steps=10", "pruning=none", "hydra.run.dir=run")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "eval"][-1]
    assert last["step"] == 10 and last["lr"] == pytest.approx(0.01 * (1 - 9 / 10))  # step 9 of 10 (from 0), linear decay


def test_learning_rate_schedules_equal_their_closed_forms():
    from patcli.training import lr_factor

    total, warmup = 110, 10
    for step in range(warmup):
        assert lr_factor(step, total, warmup, "cosine") == pytest.approx((step + 1) / warmup)
    for step in (10, 35, 60, 109, 200):
        progress = min((step - warmup) / 100, 1.0)
        assert lr_factor(step, total, warmup, "constant") == 1.0
        assert lr_factor(step, total, warmup, "linear") == pytest.approx(1 - progress)
        assert lr_factor(step, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_factor(60, total, warmup, "cosine") == pytest.approx(0.5) and lr_factor(60, total, warmup, "linear") == 0.5


@pytest.mark.parametrize("overrides", [["scorer=random"], ["regrowth=set", "regrowth.delta_t=5"]])
def test_a_runs_seed_draws_its_random_masks_too_and_compare_pools_the_seeds(cli, tmp_path, overrides):
    """scorer.seed and regrowth.seed were 0 whatever seed said: every seed drew the same random masks, so the spread
    over seeds never sampled them (and giving each run its own scorer.seed split compare's rows)."""
    import torch
    from safetensors.torch import load_file

    from patcli import report

    dirs = []
    for seed in (0, 1):
        code, out, err = cli("train", *TINY, "trainer.max_steps=20", "pruning.sparsity=0.5", *overrides, f"seed={seed}")
        assert code == 0, err
        dirs.append(run_dir_of(out))
    first, second = (load_file(str(d / "model.safetensors")) for d in dirs)
    assert not torch.equal(first["1.weight"] == 0, second["1.weight"] == 0)  # other masks, not only other values
    records, _ = report.load_records(dirs)
    (group,) = report.compare(records).groups
    (row,) = group.rows.values()
    assert [len(cell.values) for cell in row.cells.values()] == [2]


def test_a_record_says_the_device_threads_and_versions_its_numbers_depend_on(cli):
    """The thread count changes the floating-point sums (a joblib job runs on one thread), and the record held
    trainer.threads: null: a row could not be re-run exactly from its record."""
    import platform

    import numpy as np
    import torch

    code, out, err = cli("train", *TINY, "trainer.max_steps=4", "trainer.threads=1")
    assert code == 0, err
    assert result_of(run_dir_of(out))["extra"]["environment"] == {
        "device": "cpu", "torch_threads": 1, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine()}


def test_a_second_ctrl_c_while_the_record_is_written_waits_for_it(cli, tmp_path, monkeypatch):
    """Two SIGINTs a few ms apart (a wrapper forwarding Ctrl-C the terminal also sent): the second one broke into the
    record's write, so no result.json was left, while the CLI said the run was recorded."""
    import signal

    from patcli import jobs

    def interrupted(config, run_dir, progress=None):
        raise KeyboardInterrupt

    real = jobs.failed_record

    def second_signal_arrives(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "execute", interrupted)
    monkeypatch.setattr(jobs, "failed_record", second_signal_arrives)
    # Python's own handler, or SIG_IGN where the tests run in a shell's background job, which ignores SIGINT
    before = signal.getsignal(signal.SIGINT)
    code, _, err = cli("train", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 130 and err.strip() == "error: interrupted (a run already started is recorded in its result.json with status 'interrupted')"
    assert result_of(tmp_path / "run")["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before


def no_space_on(*endings):
    """An ``open`` for patcli.records that fails as a full disk does on files whose name ends so."""
    import builtins
    import errno

    def opener(path, *args, **kwargs):
        if str(path).endswith(endings):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return builtins.open(path, *args, **kwargs)

    return opener


def test_a_full_disk_mid_run_is_one_line_that_says_the_record_could_not_be_written_either(cli, tmp_path, monkeypatch):
    """metrics.jsonl could not take a line, then the failed record could not be written: two chained tracebacks."""
    from patcli import records

    monkeypatch.setattr(records, "open", no_space_on("metrics.jsonl", ".tmp"), raising=False)
    code, _, err = cli("train", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path}/run/metrics.jsonl: No space left on device; its record could "
                          f"not be written either (cannot write {tmp_path}/run/result.json: No space left on device)"), err
    assert not (tmp_path / "run" / "result.json").exists() and not list((tmp_path / "run").glob(".result.json.*"))


def test_a_model_that_cannot_be_saved_is_one_line_and_the_run_is_recorded_failed(cli, tmp_path, monkeypatch):
    """safetensors' own error for a full disk came out as a 120-line traceback."""
    from safetensors import SafetensorError

    from patcli import runner

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(runner, "save_file", full)
    code, _, err = cli("train", *TINY, f"hydra.run.dir={tmp_path}/run")
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write {tmp_path}/run/model.safetensors: Error while serializing"), err
    record = result_of(tmp_path / "run")
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    assert not list((tmp_path / "run").glob(".model.safetensors*"))


@pytest.mark.parametrize("command", ["train", "prune-post", "sweep"])
def test_hydra_mode_is_the_commands_to_choose(cli, command, tmp_path):
    """hydra.mode=MULTIRUN on train ended in an AssertionError traceback inside Hydra."""
    code, _, err = cli(command, *TINY, "hydra.mode=MULTIRUN", f"hydra.run.dir={tmp_path}/run")
    assert code == 2 and err.strip().startswith("error: hydra.mode: the command sets it (train and prune-post run one job, "
                                                "sweep a multirun); allowed: leave it out"), err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    """Pressed within the first second (while Hydra and rich import) it printed a KeyboardInterrupt traceback."""
    import builtins

    from patcli import entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "cli" or name.endswith(".cli"):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


@pytest.mark.parametrize("exit_code", [130, 0, 1])
def test_once_the_command_is_done_a_ctrl_c_while_the_process_exits_is_ignored(monkeypatch, exit_code):
    """A second SIGINT 10 ms after the first broke into the interpreter's exit (torch's finalizers) with a traceback;
    so did a first one while a finished joblib sweep's workers were joined at exit (about 2 s), with exit code 0."""
    import signal

    from patcli import cli, entry

    def stopped():
        raise SystemExit(exit_code)

    monkeypatch.setattr(cli, "main", stopped)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            entry.main()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
