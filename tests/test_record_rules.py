"""Rules of run records and comparison tables, pinned with values worked out by hand (not by the code under test).

Each test here kills a small plausible bug (a mutation) that the rest of the suite let through: report cells and
rows, record reading and writing, what finish_record counts from a model, compressed and structured exports, and
the training loop's schedule, clipping, evaluation and shuffling rules.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import row_dense_value
from patcli import report
from patcli.records import (RecordError, RunRecord, append_metrics, mask_update_row, read_record, write_atomic,
                            write_record)

# -- comparison tables, on records made by hand -----------------------------------------------------------------------


def rec(name, method, recipe, sparsity, value, *, seed=0, config=None, achieved=None, steps=1000, metrics=None, **extra):
    """An ok record whose test accuracy is ``value`` (and test loss 1 - value)."""
    return RunRecord(method=method, recipe=recipe, model="mlp", dataset="digits", model_dataset_hash="h", seed=seed,
                     target_sparsity=sparsity, achieved_sparsity=sparsity if achieved is None else achieved,
                     metrics=metrics or {"test": {"accuracy": value, "loss": 1 - value}},
                     total_train_steps=steps, train_steps=steps, config=config or {}, run_dir=f"/runs/{name}",
                     run_id=name, **extra)


PAT = "agp+magnitude+global"


def pooled_runs():
    """dense 0.97; PAT at 90% over three seeds (0.90, 0.93, 0.99) and at 95% once (0.80)."""
    return [
        rec("d0", "dense", "dense", 0.0, 0.97),
        rec("p0", "pat", PAT, 0.9, 0.90, seed=0, achieved=0.895, steps=1000),
        rec("p1", "pat", PAT, 0.9, 0.93, seed=1, achieved=0.905, steps=1000),
        rec("p2", "pat", PAT, 0.9, 0.99, seed=2, achieved=0.910, steps=1200),
        rec("p3", "pat", PAT, 0.95, 0.80, seed=0, achieved=0.950, steps=1000),
    ]


def test_a_cell_is_the_mean_and_sample_std_of_its_runs_and_its_row_shows_their_spread():
    """Three seeds: mean 0.94 (the median is 0.93); squared deviations 0.0016 + 0.0001 + 0.0025 = 0.0042, so the
    sample std is sqrt(0.0042 / 2) = 0.045826 (the population one, sqrt(0.0042 / 3) = 0.037417, is not it); one run
    shows no ±; the row says runs 1–3 and steps 1,000–1,200."""
    (group,) = report.compare(pooled_runs()).groups
    row = group.rows[f"PAT {PAT}"]
    cell = row.cells[0.9]
    assert cell.mean == pytest.approx(0.94, abs=1e-12)
    assert cell.std == pytest.approx(0.0458258, abs=1e-7)
    assert report.cell_text(cell, group, row_dense_value(row)) == "94.0±4.6 (-3.0)"
    assert report.cell_text(row.cells[0.95], group, row_dense_value(row)) == "80.0 (-17.0)"  # one run: no ±
    assert report.runs_text([row]) == "1–3" and row.steps_text() == "1,000–1,200"


def test_csv_and_json_rows_carry_the_mean_achieved_sparsity_the_signed_delta_and_no_std_for_one_run():
    """achieved (0.895 + 0.905 + 0.910) / 3 = 0.903333, not the column nor the largest; delta = mean − dense."""
    rows = {(r["row"], r["target_sparsity"]): r for r in report.long_rows(report.compare(pooled_runs()))}
    ninety, ninety_five, dense = rows[(f"PAT {PAT}", 0.9)], rows[(f"PAT {PAT}", 0.95)], rows[("dense", 0.0)]
    assert ninety["achieved_sparsity"] == pytest.approx(0.903333333, abs=1e-9)
    assert ninety["delta_vs_dense"] == pytest.approx(-0.03, abs=1e-12) and ninety["n"] == 3
    assert ninety["std"] == pytest.approx(0.0458258, abs=1e-7)
    assert (ninety["train_steps_min"], ninety["train_steps_max"]) == (1000, 1200)
    assert ninety_five["std"] is None and ninety_five["n"] == 1 and ninety_five["achieved_sparsity"] == 0.95
    assert ninety_five["delta_vs_dense"] == pytest.approx(-0.17, abs=1e-12)
    assert dense["std"] is None and dense["delta_vs_dense"] == 0.0 and dense["achieved_sparsity"] == 0.0
    as_json = json.loads(report.to_json(report.compare(pooled_runs())))["rows"]
    assert [r["std"] for r in as_json if r["n"] == 1] == [None, None]  # null in json, as the README says
    as_csv = list(csv.DictReader(io.StringIO(report.to_csv(report.compare(pooled_runs())))))
    assert [r["std"] for r in as_csv if r["n"] == "1"] == ["", ""]  # empty in csv


def test_n_counts_runs_not_distinct_seeds():
    """Seed 0 pruned from two different starting points is two samples: n = 2 though one seed."""
    records = [rec(f"p{i}", "pat", PAT, 0.9, v, seed=0, config={"trainer": {"init_from": f"/runs/dense-{i}"}})
               for i, v in enumerate((0.9, 0.8))]
    (row,) = report.long_rows(report.compare(records))
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.85) and row["std"] == pytest.approx(math.sqrt(0.005))


def test_rows_order_pat_by_label_then_baselines_in_their_fixed_order_then_the_rest():
    """PAT first (by label), then post:magnitude, gradient, structured, iterative, whatever order they came in."""
    records = [rec(name, method, recipe, 0.9, 0.5) for name, method, recipe in (
        ("x", "post:custom", "post:custom"), ("i", "post:iterative", "post:iterative"),
        ("s", "post:structured", "post:structured"), ("g", "post:gradient", "post:gradient"),
        ("pb", "pat", "b+recipe"), ("m", "post:magnitude", "post:magnitude"), ("pa", "pat", "a+recipe"))]
    (group,) = report.compare(records).groups
    assert [row.label for row in group.ordered_rows()] == [
        "PAT a+recipe", "PAT b+recipe", "post:magnitude", "post:gradient", "post:structured", "post:iterative",
        "post:custom"]


def test_where_or_how_a_baseline_ran_and_the_pat_settings_it_ignores_never_split_its_row():
    """Device, threads, output_root, dense=, pruning.masking and regularizer settings: one row of six seeds."""
    base = {"baseline": {"name": "magnitude"}, "pruning": {"mode": "unstructured", "masking": "inplace"},
            "trainer": {"device": "cpu", "threads": 1}, "output_root": "outputs", "dense": None,
            "regularizer": {"name": "none", "lam": 0.0}}
    variants = [base,
                {**base, "trainer": {"device": "cuda", "threads": 1}},
                {**base, "trainer": {"device": "cpu", "threads": 4}},
                {**base, "output_root": "/elsewhere"},
                {**base, "dense": "/runs/dense"},
                {**base, "pruning": {"mode": "unstructured", "masking": "dense_shadow"}, "regularizer": {"name": "lasso", "lam": 1.0}}]
    records = [rec(f"m{seed}", "post:magnitude", "post:magnitude", 0.9, 0.5 + seed / 100, seed=seed, config=config)
               for seed, config in enumerate(variants)]
    (group,) = report.compare(records).groups
    assert list(group.rows) == ["post:magnitude"] and group.rows["post:magnitude"].cells[0.9].n == 6


def test_a_dense_runs_layer_cap_never_splits_it_but_pat_masking_does():
    """pruning.max_layer_sparsity is inert for a dense run; PAT reads pruning.masking, so that is another recipe."""
    records = [rec("d0", "dense", "dense", 0.0, 0.96, seed=0, config={"pruning": {"mode": "none", "max_layer_sparsity": 0.99}}),
               rec("d1", "dense", "dense", 0.0, 0.98, seed=1, config={"pruning": {"mode": "none", "max_layer_sparsity": 0.9}}),
               rec("p0", "pat", PAT, 0.9, 0.9, config={"pruning": {"mode": "unstructured", "masking": "inplace"}}),
               rec("p1", "pat", PAT, 0.9, 0.8, config={"pruning": {"mode": "unstructured", "masking": "dense_shadow"}})]
    (group,) = report.compare(records).groups
    assert group.dense.cells[0.0].n == 2 and group.dense_value == pytest.approx(0.97)
    assert sorted(group.rows) == [f"PAT {PAT} [pruning.masking=dense_shadow]", f"PAT {PAT} [pruning.masking=inplace]"]


def test_folds_pool_into_one_row_apart_from_the_fixed_split():
    records = [rec("f0", "pat", PAT, 0.9, 0.90, config={"dataset": {"val_fold": 0}}),
               rec("f1", "pat", PAT, 0.9, 0.92, config={"dataset": {"val_fold": 1}}),
               rec("fixed", "pat", PAT, 0.9, 0.50, config={"dataset": {"val_fold": None}})]
    (group,) = report.compare(records).groups
    cells = {label: row.cells[0.9] for label, row in group.rows.items()}
    assert sorted((c.n, round(c.mean, 6)) for c in cells.values()) == [(1, 0.5), (2, 0.91)]


def test_a_baseline_without_a_citation_compares_with_the_dense_run_trained_like_it_whatever_its_pruning_settings():
    """training_key drops pruning.* and baseline.*: a 10-epoch baseline finds the 10-epoch dense run (0.88), not the
    dense row of two 5-epoch runs (0.72)."""
    def config(epochs, mode, baseline):
        return {"trainer": {"epochs": epochs}, "pruning": {"mode": mode, "sparsity": 0.8}, "baseline": {"name": baseline}}
    records = [rec("d5a", "dense", "dense", 0.0, 0.70, seed=0, config=config(5, "none", "none")),
               rec("d5b", "dense", "dense", 0.0, 0.74, seed=1, config=config(5, "none", "none")),
               rec("d10", "dense", "dense", 0.0, 0.88, seed=0, config=config(10, "none", "none")),
               rec("m10", "post:magnitude", "post:magnitude", 0.8, 0.47, config=config(10, "unstructured", "magnitude"))]
    (group,) = report.compare(records).groups
    assert group.dense_value == pytest.approx(0.72)
    assert row_dense_value(group.rows["post:magnitude"]) == pytest.approx(0.88)


def cite(run_id, metrics):
    return {"run_id": run_id, "run_dir": f"/runs/{run_id}", "metrics": metrics}


def test_a_row_citing_several_dense_runs_compares_with_the_mean_of_their_results():
    """Seeds 0 and 1 pruned from dense runs of 0.96 and 0.98: difference to 0.97, i.e. (0.5+0.6)/2 − 0.97 = −0.42."""
    records = [rec("m0", "post:magnitude", "post:magnitude", 0.9, 0.5, seed=0, dense_reference=cite("d0", {"test": {"accuracy": 0.96}})),
               rec("m1", "post:magnitude", "post:magnitude", 0.9, 0.6, seed=1, dense_reference=cite("d1", {"test": {"accuracy": 0.98}}))]
    (row,) = [r for r in report.long_rows(report.compare(records)) if r["method"] == "post:magnitude"]
    assert row["delta_vs_dense"] == pytest.approx(-0.42, abs=1e-12)


def test_a_citation_without_the_split_falls_back_to_the_row_of_the_cited_dense_runs():
    """One citation lacks the test value: its mean of one (0.90) is no answer; the cited runs' row (0.92) is."""
    records = [rec("d0", "dense", "dense", 0.0, 0.90, seed=0), rec("d1", "dense", "dense", 0.0, 0.94, seed=1),
               rec("m0", "post:magnitude", "post:magnitude", 0.9, 0.5, seed=0, dense_reference=cite("d0", {"test": {"accuracy": 0.90}})),
               rec("m1", "post:magnitude", "post:magnitude", 0.9, 0.6, seed=1, dense_reference=cite("d1", {"val": {"accuracy": 0.9}}))]
    (group,) = report.compare(records).groups
    assert row_dense_value(group.rows["post:magnitude"]) == pytest.approx(0.92)


def test_a_cited_dense_row_wins_over_dense_rows_that_merely_trained_alike():
    """Two dense setups trained alike (they differ in pruning.exclude only): the baseline's cited one (0.80) is its
    reference, not the dense row of more runs (0.91)."""
    plain, excluding = {"pruning": {"mode": "none", "exclude": []}}, {"pruning": {"mode": "none", "exclude": ["5.weight"]}}
    records = [rec("dA0", "dense", "dense", 0.0, 0.90, seed=0, config=plain),
               rec("dA1", "dense", "dense", 0.0, 0.92, seed=1, config=plain),
               rec("dB", "dense", "dense", 0.0, 0.80, seed=0, config=excluding),
               rec("m", "post:magnitude", "post:magnitude", 0.9, 0.5, config={"pruning": {"mode": "unstructured", "exclude": ["5.weight"]}},
                   dense_reference=cite("dB", {}))]
    (group,) = report.compare(records).groups
    assert group.dense_value == pytest.approx(0.91)
    assert row_dense_value(group.rows["post:magnitude"]) == pytest.approx(0.80)


def test_on_a_tie_in_runs_the_reference_dense_is_the_fixed_splits():
    records = [rec("cv", "dense", "dense", 0.0, 0.95, config={"dataset": {"val_fold": 0}}),
               rec("fixed", "dense", "dense", 0.0, 0.97, config={"dataset": {"val_fold": None}})]
    (group,) = report.compare(records).groups
    assert group.dense_value == pytest.approx(0.97)


def test_target_sparsities_are_columns_to_six_decimals():
    records = [rec("a", "pat", PAT, 0.9, 0.9), rec("b", "pat", PAT, 0.901, 0.8), rec("c", "pat", PAT, 0.9 + 1e-9, 0.7, seed=1)]
    (group,) = report.compare(records).groups
    assert group.columns == [0.9, 0.901] and group.rows[f"PAT {PAT}"].cells[0.9].n == 2


def test_the_markdown_dense_row_is_bold_only_where_it_leads_the_dense_column():
    """Outside the 0% column the dense reference competes with nothing: plain text."""
    records = [rec("d", "dense", "dense", 0.0, 0.97), rec("p", "pat", PAT, 0.9, 0.95)]
    lines = report.to_markdown(report.compare(records)).splitlines()
    assert "| dense | 1,000 | 1 | 97.0 |" in lines and f"| PAT {PAT} | 1,000 | 1 | **95.0 (-2.0)** |" in lines


def test_the_plot_draws_each_row_at_percent_sparsity_with_sample_std_bars_and_dense_as_a_line(tmp_path, monkeypatch):
    from matplotlib.axes import Axes  # the test extra installs it: a missing plot extra fails here, not skips

    drawn, lines = {}, []
    errorbar, axhline = Axes.errorbar, Axes.axhline
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, yerr=None, **k: (
        drawn.__setitem__(k["label"], (list(x), list(y), list(yerr))), errorbar(self, x, y, yerr=yerr, **k))[1])
    monkeypatch.setattr(Axes, "axhline", lambda self, y=0, *a, **k: (lines.append(y), axhline(self, y, *a, **k))[1])
    report.plot(report.compare(pooled_runs()), tmp_path / "curves.png")
    x, y, yerr = drawn[f"PAT {PAT}"]
    assert x == pytest.approx([90.0, 95.0]) and y == pytest.approx([94.0, 80.0])
    assert yerr == pytest.approx([100 * math.sqrt(0.0021), 0.0], abs=1e-9)
    assert lines == pytest.approx([97.0])


# -- records: reading, metrics lines, atomic writes ----------------------------------------------------------------


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def record_data(**changes) -> dict:
    data = json.loads(rec("r", "pat", PAT, 0.9, 0.9).to_json())
    data.update(changes)
    return data


def test_a_record_of_a_newer_schema_is_refused_and_the_current_one_read(tmp_path):
    assert read_record(write_json(tmp_path / "now" / "result.json", record_data(schema_version=1))).schema_version == 1
    with pytest.raises(RecordError, match="schema_version 2 is newer than this patcli"):
        read_record(write_json(tmp_path / "next" / "result.json", record_data(schema_version=2)))


def test_a_finished_run_needs_its_metric_on_one_split_and_a_failed_run_may_hold_nan(tmp_path):
    """Only val is enough; neither is refused; a failed (diverged) run's NaN is what happened, so it reads."""
    only_val = record_data(metrics={"val": {"accuracy": 0.9}})
    assert read_record(write_json(tmp_path / "val" / "result.json", only_val)).primary_value("val") == 0.9
    with pytest.raises(RecordError, match="a finished run without its accuracy metric"):
        read_record(write_json(tmp_path / "none" / "result.json", record_data(metrics={"test": {"loss": 1.0}})))
    failed = write_json(tmp_path / "failed" / "result.json",  # json.dumps writes NaN, as a diverged run's record holds
                        record_data(status="failed", metrics={"test": {"accuracy": float("nan")}}))
    assert math.isnan(read_record(failed).metrics["test"]["accuracy"])


def test_a_cited_dense_runs_metric_that_is_not_finite_is_refused(tmp_path):
    data = record_data(dense_reference={"run_id": "d", "run_dir": "/d", "metrics": {"test": {"accuracy": "Infinity"}}})
    path = tmp_path / "r" / "result.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data).replace('"Infinity"', "Infinity"))
    with pytest.raises(RecordError, match="dense_reference.metrics.test.accuracy: not a finite number"):
        read_record(path)


def test_a_record_read_back_keeps_its_run_id_and_takes_the_folder_it_was_read_from(tmp_path):
    record = rec("r", "pat", PAT, 0.9, 0.9)
    record.run_id = "fixed-id"
    write_record(tmp_path / "first", record)
    (tmp_path / "first").rename(tmp_path / "moved")
    again = read_record(tmp_path / "moved" / "result.json")
    assert again.run_id == "fixed-id" and again.run_dir == str(tmp_path / "moved")


def test_metrics_lines_write_every_non_finite_float_as_null(tmp_path):
    append_metrics(tmp_path, {"kind": "eval", "loss": float("nan"), "grad": float("inf"), "low": float("-inf"), "ok": 0.5, "n": 3})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"kind": "eval", "loss": None, "grad": None, "low": None, "ok": 0.5, "n": 3}


def test_a_mask_update_row_counts_the_optimizer_steps_done():
    """The engine's step index 4 is the fifth step: 5 steps done; 100 before (a baseline's earlier rounds) add up;
    an update made outside training follows no step."""
    update = SimpleNamespace(step=4, target=0.5, achieved=0.49)
    assert mask_update_row(update) == {"kind": "mask_update", "step": 5, "target": 0.5, "achieved": 0.49}
    assert mask_update_row(update, steps_before=100)["step"] == 105
    assert mask_update_row(update, steps_before=100, after_a_step=False)["step"] == 100


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "result.json"
    write_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "new \udc80\n")  # a lone surrogate cannot be encoded: the write fails midway
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_an_atomic_write_replaces_the_file_so_a_reader_that_opened_the_old_one_reads_it_whole(tmp_path):
    path = tmp_path / "result.json"
    write_atomic(path, "old record\n")
    with open(path) as reader:
        write_atomic(path, "new\n")
        assert reader.read() == "old record\n"
    assert path.read_text() == "new\n"


# -- what a finished run's record counts from its model ---------------------------------------------------------------


def config_for(*overrides: str, output_root: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from patcli.config import parse_run_config
    from patcli.hydra_app import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", [*overrides, f"output_root={output_root}"])
    return parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))


TINY_MLP = ["model.hidden=[32,32]", "trainer.epochs=1", "trainer.max_steps=3", "trainer.device=cpu"]


def tiny_model_and_data():
    """digits' MLP 64-32-32-10: weights 1.weight 32×64, 3.weight 32×32, 5.weight 10×32 (3,392), 74 biases."""
    from patcli.data import load_dataset
    from patcli.config import NamedConfig
    from patcli.models import build_model

    torch.manual_seed(1)  # an untrained model whose val and test accuracies differ (12/180 and 22/360 here)
    data = load_dataset(NamedConfig("digits", {}))
    return build_model(NamedConfig("mlp", {"hidden": [32, 32]}), data.meta), data


def hand_accuracy(model, split) -> float:
    with torch.no_grad():
        return float((model(split.inputs).argmax(-1) == split.targets).float().mean())


def hand_zeroed_model_and_data():
    """The tiny model with 1,024 zeros in 1.weight, 256 in 3.weight, 1 in 5.weight and 2 in 1.bias."""
    model, data = tiny_model_and_data()
    with torch.no_grad():
        model[1].weight.view(-1)[:1024] = 0
        model[3].weight.view(-1)[:256] = 0
        model[5].weight[0, 0] = 0
        model[1].bias[:2] = 0
    return model, data


def test_finish_record_counts_sparsity_params_and_bytes_from_the_model(tmp_path):
    """Zeros: 1,024 of 1.weight (0.5), 256 of 3.weight (0.25), 1 of 5.weight (1/320): 1,281 / 3,392 overall (not
    the layers' mean, 0.25104); two biases zero too: 3,466 − 1,283 = 2,183 non-zero."""
    from patcli.runner import base_record, finish_record

    config = config_for(*TINY_MLP, output_root=tmp_path)
    model, data = hand_zeroed_model_and_data()
    record = finish_record(base_record(config, data), model, config, data, tmp_path, torch.device("cpu"))
    assert record.params_prunable == 3392 and record.params_total == 3466 and record.params_nonzero == 2183
    assert record.achieved_sparsity == pytest.approx(1281 / 3392, abs=1e-12)
    assert record.per_layer_sparsity == pytest.approx({"1.weight": 0.5, "3.weight": 0.25, "5.weight": 1 / 320}, abs=1e-12)
    assert record.bytes_on_disk == os.path.getsize(tmp_path / "model.safetensors")
    val, test = hand_accuracy(model, data.val), hand_accuracy(model, data.test)
    assert val != pytest.approx(test, abs=1e-3)  # so a record that evaluated one split twice would show
    assert record.metrics["val"]["accuracy"] == pytest.approx(val, abs=1e-6)
    assert record.metrics["test"]["accuracy"] == pytest.approx(test, abs=1e-6)


def test_a_structured_run_counts_only_weights_and_exports_the_model_without_its_dead_neurons(tmp_path):
    """Neurons 0–15 of the first hidden layer dead (rows of 1.weight, its bias, columns of 3.weight): 1,024 + 512 zeros
    of 3,392 weights (biases do not count); the export is 64-16-32-10: 1,024+16 + 512+32 + 320+10 = 1,914 params."""
    from patcli.runner import base_record, finish_record

    config = config_for(*TINY_MLP, "pruning=neurons", "pruning.sparsity=0.5", output_root=tmp_path)
    model, data = tiny_model_and_data()
    with torch.no_grad():
        model[1].weight[:16] = 0
        model[1].bias[:16] = 0
        model[3].weight[:, :16] = 0
    record = finish_record(base_record(config, data), model, config, data, tmp_path, torch.device("cpu"))
    assert record.params_prunable == 3392 and record.achieved_sparsity == pytest.approx(1536 / 3392, abs=1e-12)
    assert record.per_layer_sparsity == pytest.approx({"1.weight": 0.5, "3.weight": 0.5, "5.weight": 0.0})
    assert record.params_after == 1914 and record.params_total == 3466
    assert record.bytes_after == os.path.getsize(tmp_path / "export" / "model.safetensors")
    assert record.bytes_before == os.path.getsize(tmp_path / "model.safetensors")


def test_the_engine_figures_of_a_run_sum_updates_keep_the_largest_state_and_set_time_against_the_rest(tmp_path):
    """Two pruners (a baseline's rounds): 2 + 3 updates; 100 and 300 bytes held one after the other → 300; 1 s of
    engine in 5 s of training is 1 / (5 − 1) = 0.25 over the rest of the loop."""
    from patcli.runner import record_engine

    record = rec("r", "pat", PAT, 0.9, 0.9)
    pruners = [SimpleNamespace(updates=[1, 2], engine_state_bytes=lambda: 100, seconds=0.25),
               SimpleNamespace(updates=[1, 2, 3], engine_state_bytes=lambda: 300, seconds=0.75)]
    record_engine(record, pruners, fit_seconds=5.0)
    assert record.mask_updates == 5 and record.engine_state_bytes == 300
    assert record.step_overhead == pytest.approx(0.25, abs=1e-12)


def test_total_train_steps_add_up_along_a_chain_of_runs_each_started_from_the_last(tmp_path):
    """3 steps each: dense 3, its continuation 6, that one's continuation 9 (its source's total, not its steps);
    a PAT run's mask updates land in metrics.jsonl numbered by the steps done."""
    from patcli.runner import execute

    first = execute(config_for(*TINY_MLP, "pruning=none", output_root=tmp_path), tmp_path / "a")
    second = execute(config_for(*TINY_MLP, "pruning=none", f"trainer.init_from={tmp_path / 'a'}", output_root=tmp_path), tmp_path / "b")
    third = execute(config_for(*TINY_MLP, "pruning.sparsity=0.5", "pruning.frequency=1", "schedule.end=2",
                               f"trainer.init_from={tmp_path / 'b'}", output_root=tmp_path), tmp_path / "c")
    assert (first.total_train_steps, second.total_train_steps, third.total_train_steps) == (3, 6, 9)
    assert third.train_steps == 3
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "mask_update"] == [1, 2, 3] and third.mask_updates == 3
    assert [(r["step"], r["epoch"]) for r in rows if r["kind"] == "eval"] == [(3, 0.15)]  # 3 of 20 steps an epoch


# -- exports: the bitmask format and its threshold ------------------------------------------------------------------


def test_compression_takes_tensors_of_64_values_or_more_at_least_half_zero_by_default():
    from patcli.engine.compressed import compress, decompress

    half = torch.tensor([1.0, 0.0] * 32)  # 64 values, exactly half zero
    state = {"half": half, "short": torch.zeros(63), "forty": torch.cat([torch.zeros(40), torch.ones(60)])}
    tensors, metadata = compress(state)
    assert sorted(tensors) == ["forty", "half::mask", "half::values", "short"]
    assert json.loads(metadata["shapes"]) == {"half": [64]}
    assert tensors["half::mask"].tolist() == [0b10101010] * 8  # numpy's big bit order: the first value is the top bit
    assert torch.equal(tensors["half::values"], torch.ones(32))
    back = decompress(tensors, metadata)
    assert all(torch.equal(back[name], value) for name, value in state.items())


def test_a_hand_packed_bitmask_decompresses_and_a_mask_that_disagrees_with_its_values_is_refused():
    from patcli.engine.compressed import FORMAT, decompress

    metadata = {"format": FORMAT, "shapes": json.dumps({"w": [2, 4]})}
    packed = torch.tensor([0b01000001], dtype=torch.uint8)  # second and last of eight kept
    (w,) = decompress({"w::mask": packed, "w::values": torch.tensor([2.0, 3.0])}, metadata).values()
    assert w.tolist() == [[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]
    with pytest.raises(ValueError, match="its mask keeps 2 values, the file holds 3"):
        decompress({"w::mask": packed, "w::values": torch.tensor([2.0, 3.0, 4.0])}, metadata)


def test_an_unstructured_export_counts_the_non_zero_parameters_and_the_files_bytes(tmp_path):
    """The same 1,283 zeros as above: 3,466 − 1,283 = 2,183 parameters after; bytes are the files' sizes."""
    from patcli.export import export_model
    from patcli.runner import base_record, save_tensors

    config = config_for(*TINY_MLP, output_root=tmp_path)
    model, data = hand_zeroed_model_and_data()
    save_tensors(model.state_dict(), tmp_path / "model.safetensors")
    record = export_model(model, config, data, tmp_path, base_record(config, data), measure_latency=False)
    assert record.params_after == 2183
    assert record.bytes_before == os.path.getsize(tmp_path / "model.safetensors")
    assert record.bytes_after == os.path.getsize(tmp_path / "export" / "compressed.safetensors")


# -- the training loop ----------------------------------------------------------------------------------------------


def toy_data(n=8):
    from patcli.data.base import DataBundle, Split

    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    targets = torch.tensor([i % 2 for i in range(n)])
    split = Split(inputs, targets)
    return DataBundle("toy", "classification", split, split, split, {"num_classes": 2})


def trainer_config(**changes):
    from patcli.config import TrainerConfig

    return TrainerConfig(**{"epochs": 1, "batch_size": 4, "lr": 1.0, "optimizer": "sgd", "momentum": 0.0,
                            "weight_decay": 0.0, "device": "cpu", **changes})


def test_max_steps_caps_the_run_and_never_lengthens_it():
    """8 samples in batches of 4: 2 steps an epoch (3 with a short last batch for 9); 3 epochs = 6."""
    from patcli.training import total_steps

    assert total_steps(toy_data(), trainer_config(epochs=3)) == 6
    assert total_steps(toy_data(9), trainer_config(epochs=3)) == 9
    assert total_steps(toy_data(), trainer_config(epochs=3, max_steps=5)) == 5
    assert total_steps(toy_data(), trainer_config(epochs=3, max_steps=100)) == 6


def test_validation_runs_every_eval_every_epochs_and_at_the_last_step():
    """2 steps an epoch, 5 epochs, every 2nd: steps 4, 8 and the last, 10; a cap of 3 steps ends mid-epoch at 1.5."""
    from patcli.training import Trainer

    rows = []
    Trainer(nn.Linear(1, 2), toy_data(), trainer_config(epochs=5, eval_every=2, lr=0.01), torch.device("cpu"), 0).fit(on_eval=rows.append)
    assert [(r["step"], r["epoch"]) for r in rows] == [(4, 2.0), (8, 4.0), (10, 5.0)]
    rows.clear()
    Trainer(nn.Linear(1, 2), toy_data(), trainer_config(epochs=5, max_steps=3, lr=0.01), torch.device("cpu"), 0).fit(on_eval=rows.append)
    assert [(r["step"], r["epoch"]) for r in rows] == [(2, 1.0), (3, 1.5)]


def test_gradients_are_clipped_by_their_total_norm_before_the_step():
    """SGD at lr 1: the step is −g · clip / ‖g‖, a move of norm 1e-3 along the raw gradient."""
    from patcli.training import Trainer

    torch.manual_seed(0)
    model = nn.Linear(1, 2)
    data = toy_data()
    reference = [p.detach().clone() for p in model.parameters()]
    probe = nn.Linear(1, 2)
    probe.load_state_dict(model.state_dict())
    first = next(iter(data.train.batches(8, torch.Generator().manual_seed(0))))
    nn.functional.cross_entropy(probe(first[0]), first[1]).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    assert grad.norm() > 0.01
    Trainer(model, data, trainer_config(batch_size=8, grad_clip=1e-3), torch.device("cpu"), 0).fit()
    moved = torch.cat([(p.detach() - r).reshape(-1) for p, r in zip(model.parameters(), reference)])
    assert moved.norm() == pytest.approx(1e-3, rel=1e-4)
    assert torch.allclose(moved, -1e-3 * grad / grad.norm(), atol=1e-7)


def test_batches_follow_a_shuffling_stream_seeded_by_the_runs_seed():
    """Two epochs of 8 samples: the order is torch.randperm's from Generator().manual_seed(seed), one per epoch."""
    from patcli.training import Trainer

    for seed in (3, 11):
        seen = []
        model = nn.Linear(1, 2)
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1).tolist()) if module.training else None)
        Trainer(model, toy_data(), trainer_config(epochs=2, lr=0.01), torch.device("cpu"), seed).fit()
        stream = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(8, generator=stream).tolist() for _ in range(2)]
        assert seen == [[float(i) for i in part] for order in orders for part in (order[:4], order[4:])]


def test_evaluation_weighs_every_sample_equally_across_batches_of_unequal_size():
    """Logits (x, 0) for x = 0, 1, 2 and targets 1, 0, 0: losses log 2, log(1 + e^-1), log(1 + e^-2), averaged per
    sample over batches of 2 and 1 (not per batch); argmax picks class 0 on the tie, so 2 of 3 are right."""
    from patcli.data.base import Split
    from patcli.training import evaluate

    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [0.0]]))
    split = Split(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([1, 0, 0]))
    losses = [math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))]  # −log softmax of the target
    result = evaluate(model, split, "classification", batch_size=2)
    assert result["loss"] == pytest.approx(sum(losses) / 3, abs=1e-6) and result["accuracy"] == pytest.approx(2 / 3)
    first = evaluate(model, split, "classification", batch_size=2, max_batches=1)
    assert first["loss"] == pytest.approx((losses[0] + losses[1]) / 2, abs=1e-6) and first["accuracy"] == 0.5
