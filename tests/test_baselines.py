"""Post-training baselines reach their targets, share dense runs safely, and iterative beats one-shot."""

import json
import re
import multiprocessing
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from patcli.config import config_hash, parse_run_config
from patcli.dense import resolve_dense
from patcli.hydra_app import conf_dir
from patcli.records import find_record_files, read_record
from patcli import report
from patcli.report import compare
from patcli.runner import execute

from conftest import TINY, result_of, run_dir_of


def config_for(*overrides: str, output_root: Path):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", [*overrides, f"output_root={output_root}"])
    return parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))


@pytest.mark.parametrize(
    "baseline, extra",
    [("magnitude", []), ("gradient", ["baseline.calibration_batches=3"]), ("iterative", ["baseline.rounds=2"]),
     ("pat_from_dense", ["schedule.end=0.5"])],
)
def test_each_unstructured_baseline_reaches_its_target_sparsity(tmp_path, baseline, extra):
    config = config_for(*TINY, f"baseline={baseline}", "pruning.sparsity=0.85", *extra, output_root=tmp_path)
    record = execute(config, tmp_path / "run")
    assert record.status == "ok"
    assert record.achieved_sparsity == pytest.approx(0.85, abs=1e-3)
    assert record.method == ("pat" if baseline == "pat_from_dense" else f"post:{baseline}")
    assert record.dense_reference["metrics"]["test"]["accuracy"] > 0.5
    dense_steps = record.dense_reference["train_steps"]
    assert record.total_train_steps == dense_steps + record.train_steps
    if baseline in ("iterative", "pat_from_dense"):
        assert record.train_steps == round(0.25 * dense_steps)


def test_structured_baseline_zeroes_whole_neurons_near_the_target(tmp_path):
    config = config_for(*TINY, "baseline=structured", "pruning.sparsity=0.6", output_root=tmp_path)
    record = execute(config, tmp_path / "run")
    # the neuron count closest to the target: within half the widest neuron (its 64 weights and 32 next-layer inputs)
    assert abs(record.achieved_sparsity - 0.6) <= (64 + 32) / 2 / (64 * 32 + 32 * 32 + 32 * 10)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    first, second = weights["1.weight"], weights["3.weight"]
    dead_rows = (first == 0).all(dim=1)
    assert int(dead_rows.sum()) > 0
    assert bool((weights["1.bias"][dead_rows] == 0).all())  # the bias of a pruned neuron is off too
    assert bool((second[:, dead_rows] == 0).all())  # and the next layer's inputs from it
    # recorded and exported like a structured PAT run: the pattern it pruned, and a smaller model
    assert record.pattern == "neurons" and (tmp_path / "run" / "export").is_dir()
    assert record.params_after < record.params_total


@pytest.mark.parametrize("pattern", ["nm", "block"])
@pytest.mark.parametrize("baseline", ["magnitude", "gradient", "iterative"])
def test_a_baseline_prunes_in_the_runs_pattern(tmp_path, baseline, pattern):
    """pruning=nm with a post-training baseline is one-shot 2:4 (or block) pruning, not unstructured recorded as nm."""
    sparsity = 0.5 if pattern == "nm" else 0.75
    config = config_for(*TINY, f"baseline={baseline}", f"pruning={pattern}", f"pruning.sparsity={sparsity}",
                        output_root=tmp_path)
    record = execute(config, tmp_path / "run")
    assert record.pattern == pattern and record.achieved_sparsity == pytest.approx(sparsity, abs=1e-3)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name in ("1.weight", "3.weight", "5.weight"):
        groups = (weights[name].reshape(weights[name].shape[0], -1, 4) != 0).sum(-1)
        assert bool((groups <= 2).all()) if pattern == "nm" else bool(((groups == 0) | (groups == 4)).all()), name


def test_structured_baseline_takes_its_channels_from_a_channel_pattern_and_rejects_others(cli, tmp_path):
    config = config_for(*TINY, "baseline=structured", "pruning=neurons", "pruning.sparsity=0.5", output_root=tmp_path)
    assert execute(config, tmp_path / "run").pattern == "neurons"
    code, _, err = cli("prune-post", *TINY, "baseline=structured", "pruning=nm")
    assert code == 2 and err.startswith("error: pruning: 'nm' is not a channel pattern for baseline=structured")
    code, _, err = cli("prune-post", *TINY, "baseline=structured", "baseline.kind=filters", "pruning=neurons")
    assert code == 2 and err.strip() == "error: baseline.kind: 'filters' contradicts pruning=neurons; allowed: auto or neurons"
    code, _, err = cli("prune-post", "model=cnn", "trainer.epochs=1", "baseline=structured", "pruning=neurons")
    assert code == 2 and err.strip() == ("error: pruning: the model (Sequential) has no neurons to remove; allowed here: "
                                         "pruning=filters")  # pruning= chose the kind, so pruning is the key to change


def test_a_given_dense_run_lends_the_baseline_its_seed_and_trainer_and_unused_options_are_named(cli, tmp_path, caplog):
    """Fine-tuning uses the dense run's trainer; a record that said seed 3 would pool as a seed it never trained."""
    code, _, err = cli("train", *TINY, "pruning=none", f"hydra.run.dir={tmp_path}/dense")
    assert code == 0, err
    code, out, err = cli("prune-post", *TINY[:2], "trainer.lr=0.05", "seed=3", "baseline=magnitude", f"dense={tmp_path}/dense",
                         "scorer=movement")
    assert code == 0, err
    record = result_of(run_dir_of(out))
    assert record["seed"] == 0 and record["config"]["seed"] == 0 and record["config"]["trainer"]["lr"] == 0.01
    said = out + err + caplog.text
    assert "seed=0 (not 3), trainer.lr=0.01 (not 0.05): this run uses and records those" in said, said
    assert "baseline=magnitude prunes its own way: scorer=movement does not apply" in said
    # a channel scorer, which unstructured PAT refuses, is as unused here: it was refused before the baseline ran
    code, out, err = cli("prune-post", *TINY[:2], "baseline=gradient", f"dense={tmp_path}/dense", "scorer=taylor")
    assert code == 0, err
    assert "baseline=gradient prunes its own way: scorer=taylor does not apply" in out + err + caplog.text


def test_iterative_beats_one_shot_magnitude_at_95_percent_on_digits(tmp_path):
    results = {}
    for baseline in ("magnitude", "iterative"):
        config = config_for(f"baseline={baseline}", "pruning.sparsity=0.95", output_root=tmp_path)
        results[baseline] = execute(config, tmp_path / baseline).metrics["test"]["accuracy"]
    assert results["iterative"] > results["magnitude"] + 0.2, results


def _resolve_in_process(output_root: str, queue, both_ready) -> None:
    import patcli.dense

    train_dense = patcli.dense.train_dense

    def counted(*args, **kwargs):
        with open(Path(output_root) / "trainings.log", "a") as log:
            log.write("trained\n")
        return train_dense(*args, **kwargs)

    patcli.dense.train_dense = counted
    config = config_for(*TINY, "baseline=magnitude", output_root=Path(output_root))
    both_ready.wait(timeout=600)  # both ask at once: training takes seconds, so without the lock both would train
    queue.put(str(resolve_dense(config)))


def test_parallel_jobs_train_the_shared_dense_run_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue, both_ready = context.Queue(), context.Barrier(2)
    workers = [context.Process(target=_resolve_in_process, args=(str(tmp_path), queue, both_ready)) for _ in range(2)]
    for worker in workers:
        worker.start()
    found = {queue.get(timeout=900) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
    assert (tmp_path / "trainings.log").read_text() == "trained\n"  # one job trained it, the other waited and found it
    assert len(found) == 1  # both jobs got the same dense run
    trained = [p for p in (tmp_path / "dense").iterdir() if p.is_dir()]
    assert len(trained) == 1 and (trained[0] / "result.json").is_file()


def test_a_dense_reference_that_never_finished_is_trained_afresh_not_appended_to(cli, tmp_path):
    """An interrupted prune-post leaves the dense cache folder without a record: its metrics must not mix in."""
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=first")
    assert code == 0, err
    (dense,) = [p for p in (tmp_path / "outputs" / "dense").iterdir() if p.is_dir()]
    def rows() -> list[dict]:  # without the wall time, which differs between the two trainings
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (dense / "metrics.jsonl").open()]

    first = rows()
    (dense / "result.json").unlink()  # as if the first attempt had been stopped before its record
    with open(dense / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "eval", "step": 999999}\n')
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=second")
    assert code == 0, err
    assert rows() == first and (dense / "result.json").is_file()


@pytest.mark.parametrize("damage", ["model.safetensors", ".hydra/config.yaml", "empty model.safetensors"])
def test_a_cached_dense_run_missing_its_weights_or_config_is_trained_again_not_reused(cli, tmp_path, damage):
    """Every baseline of every later sweep failed on it ("does not load into this model"), never saying to delete it."""
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=first")
    assert code == 0, err
    (dense,) = [p for p in (tmp_path / "outputs" / "dense").iterdir() if p.is_dir()]
    if damage.startswith("empty"):
        (dense / "model.safetensors").write_bytes(b"")
    else:
        (dense / damage).unlink()
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=second")
    assert code == 0, err
    assert result_of(tmp_path / "second")["status"] == "ok" and (dense / "model.safetensors").stat().st_size > 0
    assert (tmp_path / "second" / "run.log").read_text().count(f"{dense.name} cannot be reused") == 1  # it was said twice
    code, _, err = cli("prune-post", *TINY, "baseline=gradient", "hydra.run.dir=third")  # the new one serves
    assert code == 0 and "cannot be reused" not in (tmp_path / "third" / "run.log").read_text()  # "a new one is trained"


@pytest.mark.parametrize("cut", ["valid YAML", "broken YAML"])
def test_a_dense_runs_snapshot_cut_short_is_refused_when_given_and_passed_over_when_found(cli, tmp_path, cut):
    """Cut to valid YAML, the snapshot rebuilt a model and trainer other than the run's, and the baseline's record said
    ok with another model/data hash; broken, a dense run found in the cache stopped every baseline with exit 2."""
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=first")
    assert code == 0, err
    (dense,) = [p for p in (tmp_path / "outputs" / "dense").iterdir() if p.is_dir()]
    snapshot = dense / ".hydra" / "config.yaml"
    text = snapshot.read_text()
    snapshot.write_text(text[:text.index("trainer:") + len("trainer:\n")] if cut == "valid YAML" else text + "\n: [")
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", f"dense={dense}")
    why = "no longer matches its record (cut short or edited)" if cut == "valid YAML" else "is damaged or not a patcli config"
    assert code == 2 and err.startswith(f"error: dense: {dense}") and why in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=second")  # found in the cache
    assert code == 0 and result_of(tmp_path / "second")["status"] == "ok", err
    assert f"{dense.name} cannot be reused" in (tmp_path / "second" / "run.log").read_text()
    assert result_of(tmp_path / "second")["model_dataset_hash"] == result_of(tmp_path / "first")["model_dataset_hash"]


def test_a_dense_cache_that_cannot_be_written_stops_only_the_runs_that_need_it(cli, tmp_path):
    """train refused to run while output_root/dense, which it never writes, could not be made."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "dense").write_text("in the way")
    code, _, err = cli("train", *TINY, "hydra.run.dir=run")
    assert code == 0 and result_of(tmp_path / "run")["status"] == "ok", err
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=baseline")
    assert code == 2 and err.startswith("error: output_root: ") and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", f"dense={tmp_path}/run", "hydra.run.dir=given")
    assert code == 2 and "dense: " in err  # a PAT run is no dense one: refused for that, not for the cache


def test_a_dense_value_that_cannot_resolve_is_one_line(cli, tmp_path):
    """Read for the cache check before validation, it ended in an InterpolationKeyError traceback."""
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "dense=${nope}")
    assert code == 2 and err.strip() == "error: dense: cannot resolve its interpolation: Interpolation key 'nope' not found"


def test_a_given_dense_run_whose_text_file_is_gone_is_named_as_another_dataset(cli, tmp_path, monkeypatch):
    """The snapshot check read the gone file first and blamed dataset.path, a path the user never gave."""
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    text = ["model=gpt", "model.d_model=16", "model.n_head=2", "dataset=text", "dataset.block_size=16", "trainer.max_steps=5"]
    for name in ("old.txt", "new.txt"):
        (tmp_path / name).write_text("for i in range(10):\n    print(i * i)\n" * 100)
    code, _, err = cli("train", *text, "dataset.path=old.txt", "pruning=none", "hydra.run.dir=dense")
    assert code == 0, err
    (tmp_path / "old.txt").unlink()
    code, _, err = cli("prune-post", *text, "dataset.path=new.txt", "baseline=magnitude", f"dense={tmp_path}/dense")
    assert code == 2 and err.startswith(f"error: dense: {tmp_path}/dense was trained with another model/dataset config"), err


def test_a_file_in_the_dense_caches_way_is_left_alone_and_named_in_one_line(cli, tmp_path):
    """A file where the dense run's folder goes, or a folder where its lock goes, ended in a traceback."""
    import shutil

    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=first")
    assert code == 0, err
    (dense,) = [p for p in (tmp_path / "outputs" / "dense").iterdir() if p.is_dir()]
    shutil.rmtree(dense)
    dense.write_text("a note of one's own")
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=second")
    assert code == 1 and err.strip() == (f"error: cannot write outputs/dense/{dense.name}: a file is where the dense run's "
                                         "folder goes; allowed: move or delete it"), err
    assert dense.read_text() == "a note of one's own"
    dense.unlink()
    lock = dense.with_name(f"{dense.name}.lock")
    lock.unlink()
    lock.mkdir()
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=third")
    assert code == 1 and err.strip().startswith(f"error: cannot write outputs/dense/{dense.name}.lock: "), err


def test_a_link_put_in_the_dense_cache_is_replaced_and_its_target_left_alone(cli, tmp_path):
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=first")
    assert code == 0, err
    (dense,) = [p for p in (tmp_path / "outputs" / "dense").iterdir() if p.is_dir()]
    shutil.rmtree(dense)
    (tmp_path / "shared").mkdir()
    dense.symlink_to(tmp_path / "shared")
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "hydra.run.dir=second")
    assert code == 0, err
    assert not dense.is_symlink() and (dense / "result.json").is_file() and list((tmp_path / "shared").iterdir()) == []


def test_stray_result_files_under_output_root_do_not_stop_the_dense_search(cli, tmp_path):
    for name, content in (("binary", bytes(range(128, 256))), ("a-list", b"[1]")):
        (tmp_path / "outputs" / name).mkdir(parents=True)
        (tmp_path / "outputs" / name / "result.json").write_bytes(content)
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude")
    assert code == 0, err
    assert result_of(run_dir_of(out))["status"] == "ok"


def test_prune_post_cli_reuses_a_given_dense_run_and_rejects_a_wrong_one(cli, tmp_path):
    code, out, err = cli("train", *TINY, "pruning=none", f"hydra.run.dir={tmp_path}/dense")
    assert code == 0, err
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude", f"dense={tmp_path}/dense", "pruning.sparsity=0.7")
    assert code == 0, err
    record = result_of(run_dir_of(out))
    assert record["method"] == "post:magnitude" and record["dense_reference"]["run_dir"] == f"{tmp_path}/dense"
    assert not (tmp_path / "outputs" / "dense").exists()  # nothing else was trained
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", f"dense={run_dir_of(out)}")
    assert code == 2 and "dense: " in err and "allowed: a finished run of `patcli train pruning=none`" in err
    # a dense run of another model would be pruned while the record names this one
    code, out, err = cli("prune-post", *TINY, "model.hidden=[16]", "baseline=magnitude", f"dense={tmp_path}/dense")
    assert code == 2 and "dense: " in err and "another model/dataset config" in err and len(err.strip().splitlines()) == 1
    # which setting differs, not only the model's name (the same here)
    assert f"{tmp_path}/dense was trained with another model/dataset config (mlp on digits; model.hidden: [32, 32] there, " \
           "[16] here)" in " ".join(err.split())
    code, _, err = cli("train", *TINY, "model.hidden=[16]", "dataset.test_size=300", f"trainer.init_from={tmp_path}/dense")
    assert code == 2 and "model.hidden: [32, 32] there, [16] here; dataset.test_size: 360 there, 300 here)" in " ".join(err.split())
    code, _, err = cli("prune-post", *TINY)
    assert code == 2 and "baseline: missing; allowed: " in err
    code, _, err = cli("train", *TINY, "baseline=magnitude")
    assert code == 2 and "patcli prune-post" in err
    code, _, err = cli("prune-post", *TINY, "baseline=iterative", "baseline.rounds=0")
    assert code == 2 and "baseline.rounds: 0 is out of range" in err
    code, _, err = cli("prune-post", *TINY, "baseline=structured", "baseline.allocation=sensitivity")  # one-shot: no loss
    assert code == 2 and "baseline.allocation: 'sensitivity' is not allowed; allowed: erk, global, lamp, uniform" in err


def test_a_found_dense_run_serves_a_baseline_evaluated_at_another_interval_which_keeps_its_own(cli, tmp_path, caplog):
    code, out, err = cli("prune-post", *TINY, "baseline=iterative", "pruning.sparsity=0.5")
    assert code == 0, err
    dense = result_of(run_dir_of(out))["dense_reference"]["run_id"]
    code, out, err = cli("prune-post", *TINY, "baseline=iterative", "pruning.sparsity=0.6", "trainer.eval_every=2")
    assert code == 0, err
    record = result_of(run_dir_of(out))
    assert record["dense_reference"]["run_id"] == dense  # the same weights: not trained again
    assert record["config"]["trainer"]["eval_every"] == 2 and "was trained with" not in caplog.text


def test_a_dense_run_recorded_before_eval_every_left_the_dense_key_still_serves_its_baselines(cli, tmp_path):
    code, out, _ = cli("train", *TINY, "pruning=none", "trainer.eval_every=2")
    dense_dir = run_dir_of(out)
    record = result_of(dense_dir)
    config = parse_run_config(record["config"])
    trainer = {k: v for k, v in record["config"]["trainer"].items() if k not in ("init_from", "device", "threads")}
    record["extra"]["dense_key"] = config_hash({"md": config.model_dataset_hash(), "trainer": trainer, "seed": 0})
    (dense_dir / "result.json").write_text(json.dumps(record))  # as patcli wrote it when the key held eval_every
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude", "trainer.eval_every=2")
    assert code == 0, err
    assert result_of(run_dir_of(out))["dense_reference"]["run_id"] == record["run_id"]  # not trained again


def test_damaged_run_files_named_by_init_from_or_dense_are_one_line_errors_before_any_run_starts(cli, tmp_path):
    code, _, err = cli("train", *TINY, "pruning=none", f"hydra.run.dir={tmp_path}/dense")
    assert code == 0, err
    weights = tmp_path / "dense" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    for command, key in ((["train", "trainer.init_from=dense"], "trainer.init_from"),
                         (["prune-post", "baseline=magnitude", "dense=dense"], "dense")):
        code, _, err = cli(*command, *TINY, "hydra.run.dir=damaged")
        assert code == 2 and err.startswith(f"error: {key}: ") and "model.safetensors does not load" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "damaged").exists()
    snapshot = tmp_path / "dense" / ".hydra" / "config.yaml"
    intact = snapshot.read_text()
    snapshot.write_text("model:\n  hidden: [32, 32\n")
    code, _, err = cli("prune-post", "baseline=magnitude", "dense=dense", *TINY, "hydra.run.dir=damaged")
    assert code == 2 and err.startswith(f"error: dense: {tmp_path}/dense/.hydra/config.yaml is damaged or not a patcli config snapshot")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "damaged").exists()
    snapshot.write_text(intact)
    (tmp_path / "dense" / "result.json").write_text("{not json")
    code, _, err = cli("train", "trainer.init_from=dense", *TINY, "hydra.run.dir=damaged")
    assert code == 2 and err.startswith("error: trainer.init_from: ") and "not a readable record" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "damaged").exists()


def test_compare_counts_a_cited_dense_run_once_after_the_runs_are_moved(cli, tmp_path):
    """A baseline cites its dense run by id: read from a moved copy, the dense run is still one run, not two."""
    code, _, err = cli("train", *TINY, "pruning=none", "hydra.run.dir=runs/dense")
    assert code == 0, err
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "dense=runs/dense", "hydra.run.dir=runs/post")
    assert code == 0, err
    dense, post = result_of(tmp_path / "runs" / "dense"), result_of(tmp_path / "runs" / "post")
    assert post["dense_reference"]["run_id"] == dense["run_id"] != ""
    assert post["dense_reference"]["run_dir"] == str((tmp_path / "runs" / "dense").resolve())
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    comparison = compare([read_record(p) for p in find_record_files([tmp_path / "moved"])])
    (group,) = comparison.groups
    assert group.dense.cells[0.0].values == [dense["metrics"]["test"]["accuracy"]]
    assert list(group.rows) == ["post:magnitude"]
    code, _, err = cli("prune-post", *TINY, "baseline=structured", "baseline.kind=heads")  # an MLP has no heads
    assert code == 2 and err.startswith("error: baseline.kind: ") and "no attention heads" in err and len(err.strip().splitlines()) == 1


def test_fine_tuning_baselines_log_their_evaluations_and_updates_as_training_runs_do(tmp_path):
    for baseline, extra in (("pat_from_dense", ["schedule.end=0.5", "pruning.frequency=2"]), ("iterative", ["baseline.rounds=2"])):
        config = config_for(*TINY, f"baseline={baseline}", "pruning.sparsity=0.8", *extra, output_root=tmp_path)
        record = execute(config, tmp_path / baseline)
        rows = [json.loads(line) for line in (tmp_path / baseline / "metrics.jsonl").read_text().splitlines()]
        updates = [r for r in rows if r["kind"] == "mask_update"]
        evals = [r for r in rows if r["kind"] == "eval"]
        assert record.mask_updates == len(updates) >= 2 and evals and record.engine_state_bytes > 0
        assert record.step_overhead is not None and record.step_overhead > 0
        assert updates[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    evals = [r for r in rows if r["kind"] == "eval"]  # iterative: an eval at the end of each round
    assert evals[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_a_structured_baselines_export_survives_exporting_it_again(cli, tmp_path):
    """patcli export rebuilt it as unstructured beside the stale shrunk model, which load_pruned then failed on."""
    import patcli

    code, out, err = cli("prune-post", *TINY, "baseline=structured", "pruning.sparsity=0.5", "hydra.run.dir=st")
    assert code == 0, err
    first = patcli.load_pruned(tmp_path / "st")
    code, out, err = cli("export", "st", "--no-latency")
    assert code == 0, err
    assert "latency" not in out  # the figures of the first export are not shown as measured now
    assert sorted(p.name for p in (tmp_path / "st" / "export").iterdir()) == ["model.json", "model.safetensors"]
    again = patcli.load_pruned(tmp_path / "st")
    assert [p.shape for p in again.parameters()] == [p.shape for p in first.parameters()]
    assert sum(p.numel() for p in again.parameters()) < result_of(tmp_path / "st")["params_total"]


def test_a_baselines_mask_update_rows_count_the_steps_done(tmp_path):
    for baseline, extra in (("magnitude", []), ("iterative", ["baseline.rounds=3"])):
        config = config_for(*TINY, f"baseline={baseline}", "pruning.sparsity=0.8", *extra, output_root=tmp_path)
        record = execute(config, tmp_path / baseline)
        rows = [json.loads(line) for line in (tmp_path / baseline / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if r["kind"] == "mask_update"]
        if baseline == "magnitude":
            assert steps == [0]  # one-shot: before any step
        else:  # each round prunes after the rounds before it fine-tuned; evals count steps over all rounds too
            assert len(steps) == 3 and steps[0] == 0 and steps == sorted(steps) and steps[-1] < record.train_steps
            ordered = [r["step"] for r in rows]
            assert ordered == sorted(ordered) and ordered[-1] == record.train_steps


def test_a_continued_dense_run_never_stands_in_for_the_dense_run_a_baseline_cites(cli, tmp_path):
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude", "pruning.sparsity=0.5", "hydra.run.dir=post")
    assert code == 0, err
    cited = result_of(tmp_path / "post")["dense_reference"]
    code, _, err = cli("train", *TINY, "pruning=none", f"trainer.init_from={cited['run_dir']}", "hydra.run.dir=more")
    assert code == 0, err
    code, out, err = cli("compare", "post", "more", "--format", "csv")  # the cited dense run is not among the paths
    assert code == 0, err
    rows = {line.split(",")[4]: line.split(",") for line in out.splitlines()[1:]}
    assert set(rows) == {"dense", "dense+init", "post:magnitude"}
    assert float(rows["dense"][9]) == pytest.approx(cited["metrics"]["test"]["accuracy"])


def test_a_baseline_started_from_a_continued_dense_run_is_compared_with_that_run(cli, tmp_path):
    code, _, err = cli("train", *TINY, "pruning=none", "hydra.run.dir=d")
    assert code == 0, err
    code, _, err = cli("train", *TINY, "pruning=none", "trainer.init_from=d", "hydra.run.dir=di")
    assert code == 0, err
    code, _, err = cli("prune-post", *TINY, "baseline=magnitude", "dense=di", "hydra.run.dir=mag")
    assert code == 0, err
    for paths in (["mag"], ["di", "mag"]):  # adding the very run it cites keeps it the reference
        code, out, err = cli("compare", *paths, "--format", "csv")
        assert code == 0, err
        rows = [line.split(",") for line in out.splitlines()[1:]]
        (post,) = [r for r in rows if r[4] == "post:magnitude"]
        cited = result_of(tmp_path / "mag")["dense_reference"]["metrics"]["test"]["accuracy"]
        assert float(post[12]) == pytest.approx(float(post[9]) - cited), paths  # the difference to the run it cites


def test_the_gradient_baseline_observes_as_many_batches_as_asked_even_beyond_one_pass(cli, monkeypatch):
    from patcli.engine import Pruner

    observed = []
    real = Pruner.observe
    monkeypatch.setattr(Pruner, "observe", lambda self, *args: (observed.append(1), real(self, *args))[1])
    code, _, err = cli("prune-post", *TINY, "baseline=gradient", "baseline.calibration_batches=45", "hydra.run.dir=g")
    assert code == 0, err
    assert len(observed) == 45  # digits' 1,257 training images make 20 batches of 64 per pass


def test_a_structured_baseline_is_one_row_whatever_pruning_mode_was_given(cli, tmp_path):
    """It removes neurons either way: its record says so, and compare does not split the two runs into rows."""
    for mode, sparsity in (("unstructured", "0.5"), ("neurons", "0.25")):
        code, _, err = cli("prune-post", *TINY, "baseline=structured", f"pruning={mode}", f"pruning.sparsity={sparsity}",
                           f"hydra.run.dir=st-{mode}")
        assert code == 0, err
        assert result_of(tmp_path / f"st-{mode}")["config"]["pruning"]["mode"] == "neurons"
    records, _ = report.load_records([tmp_path / "st-unstructured", tmp_path / "st-neurons"])
    (group,) = compare(records).groups
    assert list(group.rows) == ["post:structured"] and sorted(group.rows["post:structured"].cells) == [0.25, 0.5]


def test_the_gradient_baseline_leaves_batchnorm_statistics_as_the_dense_run_had_them(cli, tmp_path):
    """Its calibration ran in training mode: 16 batches re-estimated BatchNorm on the unpruned network, so the
    no-fine-tuning model was not the dense model plus a mask."""
    import torch
    from safetensors.torch import load_file

    cnn = ["model=cnn", "model.channels=[4,4]", "dataset.flatten=false", "trainer.epochs=1", f"output_root={tmp_path}"]
    code, out, err = cli("prune-post", *cnn, "baseline=gradient", "pruning.sparsity=0.5", "hydra.run.dir=g")
    assert code == 0, err
    record = result_of(run_dir_of(out))
    dense = load_file(Path(record["dense_reference"]["run_dir"]) / "model.safetensors")
    pruned = load_file(tmp_path / "g" / "model.safetensors")
    buffers = [k for k in dense if "running" in k or "num_batches" in k]
    assert buffers and all(torch.equal(dense[k], pruned[k]) for k in buffers)


@pytest.mark.parametrize("overrides, message", [
    (["baseline=iterative", "baseline.lr=nan"], "baseline.lr: nan is out of range; allowed: a finite number > 0 or null"),
    (["baseline=pat_from_dense", "baseline.lr=inf"], "baseline.lr: inf is out of range"),
    # checked with the channels the structured baseline removes, not the run's unstructured pattern
    (["baseline=structured", "baseline.kind=filters"], "baseline.kind: the model (Sequential) has no filters to remove; allowed here: baseline.kind=neurons"),
    (["baseline=structured", "model.hidden=[4]", "pruning.sparsity=0.98"], "pruning.sparsity: sparsity 0.98 needs"),
])
def test_a_baseline_mistake_is_one_line_before_the_dense_run_is_trained(cli, tmp_path, overrides, message):
    code, out, err = cli("prune-post", *TINY, *overrides, f"output_root={tmp_path}/out")
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_each_round_of_iterative_pruning_fine_tunes_on_new_batches(cli, monkeypatch):
    """Each round's trainer restarted the same shuffle: 10 fine-tuning steps in 3 rounds saw 4 distinct batches."""
    from patcli import training

    seen = []
    real = training.loss_and_outputs
    monkeypatch.setattr(training, "loss_and_outputs",
                        lambda model, task, inputs, targets: (model.training and seen.append(float(inputs.sum())),
                                                              real(model, task, inputs, targets))[1])
    code, _, err = cli("prune-post", *TINY, "baseline=iterative", "baseline.rounds=3", "pruning.sparsity=0.9", "hydra.run.dir=it")
    assert code == 0, err
    finetuning = seen[-10:]  # after the dense run's 40 steps: rounds of 4, 3 and 3 steps
    assert len(seen) == 50 and len(set(finetuning)) == 10


def test_a_regularizer_given_to_a_post_training_baseline_is_named_unused_and_does_not_set_its_target(cli, caplog):
    code, out, err = cli("prune-post", *TINY, "baseline=magnitude", "regularizer=lasso", "regularizer.target=0.5",
                         "pruning.sparsity=0.9", "hydra.run.dir=m")
    assert code == 0, err
    record = result_of(run_dir_of(out))
    assert record["target_sparsity"] == 0.9 and record["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert "baseline=magnitude prunes its own way: regularizer=lasso does not apply" in out + err + caplog.text


def test_more_iterative_rounds_than_fine_tuning_steps_is_a_one_line_error_before_the_dense_run(cli, tmp_path):
    """50 rounds on a 10-step budget pruned 40 times with no fine-tuning in between, without a word."""
    code, out, err = cli("prune-post", *TINY, "trainer.max_steps=40", "baseline=iterative", "baseline.rounds=50")
    assert code == 2 and err.strip() == ("error: baseline.rounds: 50 rounds share 10 fine-tuning steps "
                                         "(baseline.finetune_fraction=0.25 of 40); allowed: 1..10, or a larger "
                                         "baseline.finetune_fraction")
    assert not (tmp_path / "outputs").exists()


def test_the_rounds_check_uses_the_steps_of_the_dense_run_given(cli, tmp_path):
    """With dense=DIR the baseline fine-tunes a share of that run's steps, whatever trainer.max_steps says."""
    code, out, err = cli("train", *TINY, "pruning=none", "trainer.max_steps=40", "hydra.run.dir=d40")
    assert code == 0, err
    code, out, err = cli("prune-post", *TINY, "baseline=iterative", "dense=d40", "trainer.max_steps=8", "hydra.run.dir=it")
    assert code == 0, err
    assert result_of(tmp_path / "it")["train_steps"] == 10  # 0.25 of the dense run's 40 steps, over 3 rounds


@pytest.mark.parametrize("overrides, message", [
    (["schedule.end=30"], "schedule.end: step 30 is after the run's last step 9 (it has 10 steps)"),
    (["regrowth=rigl", "schedule=constant", "regrowth.delta_t=40"], "regrowth.delta_t: 40 steps"),
])
def test_pat_from_dense_settings_that_do_not_fit_its_fine_tuning_budget_are_refused_before_any_run(cli, tmp_path,
                                                                                                  overrides, message):
    """Its schedule runs over the fine-tuning budget (a quarter of the dense run's 40 steps), but was only checked over
    the config's own run: the error came after the run folder and a failed record were written."""
    code, out, err = cli("prune-post", *TINY, "trainer.max_steps=40", "baseline=pat_from_dense", *overrides,
                         f"output_root={tmp_path}/out", "hydra.run.dir=p")
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p").exists()


def test_a_structured_baseline_off_its_target_says_so_in_the_run_log(cli, tmp_path):
    """PAT runs said it; the structured baseline ended 0.9 points under its target without a word."""
    code, out, err = cli("prune-post", "baseline=structured", "pruning=neurons", "pruning.sparsity=0.5", "model.hidden=[30,20]",
                         "trainer.epochs=1", f"output_root={tmp_path}/out", "hydra.run.dir=s")
    assert code == 0, err
    assert result_of(tmp_path / "s")["achieved_sparsity"] == pytest.approx(0.4908, abs=1e-4)
    assert ("pruning=neurons reached 0.4908 of the prunable weights for pruning.sparsity=0.5: the nearest that whole "
            "neurons reach") in (tmp_path / "s" / "run.log").read_text()
    # which dense run it started from: a matching one found anywhere under output_root is taken (the newest)
    (dense,) = [d for d in (tmp_path / "out" / "dense").iterdir() if d.is_dir()]
    assert f"starting from the dense run {dense}" in (tmp_path / "s" / "run.log").read_text()


@pytest.mark.parametrize(("method", "status", "said"), [("pat", "ok", "is a finished 'pat' run"),
                                                       ("dense", "interrupted", "is an interrupted 'dense' run"),
                                                       ("dense", "failed", "is a failed 'dense' run")])
def test_a_dense_run_that_is_not_one_is_named_in_plain_words(tmp_path, method, status, said):
    """It read "is a ok 'pat' run" and "is a interrupted 'dense' run"."""
    from patcli.config import ConfigError
    from patcli.dense import check_dense_run
    from patcli.records import RunRecord, write_record

    write_record(tmp_path / "given", RunRecord(method=method, recipe=method, model="mlp", dataset="digits",
                                                      model_dataset_hash="h", seed=0, status=status,
                                                      metrics={"test": {"accuracy": 0.9}}))
    with pytest.raises(ConfigError, match=rf"^dense: {re.escape(str(tmp_path / 'given'))} {said}; allowed: a finished run "):
        check_dense_run(tmp_path / "given", config_for(output_root=tmp_path))


def test_a_dense_folder_that_holds_no_run_says_so_in_plain_words(tmp_path):
    """It quoted a FileNotFoundError, and named nothing allowed."""
    from patcli.config import ConfigError
    from patcli.dense import check_dense_run

    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError) as caught:
        check_dense_run(tmp_path / "folder", config_for(output_root=tmp_path))
    assert str(caught.value) == (f"dense: {tmp_path}/folder is not a patcli run (it holds no result.json); allowed: the "
                                 "folder of a finished run of `patcli train pruning=none`")


def test_a_model_dataset_mismatch_with_equal_settings_says_the_data_changed(tmp_path):
    """A text file edited since: the hash differs while every setting is the same."""
    config = config_for(output_root=tmp_path)
    assert config.model_dataset_changes(config.source) == "the same settings, other data (the file it reads changed since)"
    other = {**config.source, "dataset": {**config.source["dataset"], "val_fold": 3}}  # a fold is not a model/data change
    assert config.model_dataset_changes(other) == "the same settings, other data (the file it reads changed since)"
