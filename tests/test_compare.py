"""`patcli compare` on hand-made records: rows, cells, pooling, failures apart, and every output format."""

import csv
import io
import json
import shutil

import pytest

from conftest import TINY, row_dense_value
from patcli.records import RunRecord, write_record
from patcli import report


def record(tmp_path, name, method, recipe, sparsity, accuracy, seed=0, status="ok", steps=1000, **extra):
    rec = RunRecord(method=method, recipe=recipe, model="mlp", dataset="digits", model_dataset_hash="h1", seed=seed,
                    status=status, target_sparsity=sparsity, achieved_sparsity=sparsity,
                    metrics={"test": {"accuracy": accuracy, "loss": 1 - accuracy}, "val": {"accuracy": accuracy - 0.01}},
                    total_train_steps=steps, train_steps=steps, **extra)
    write_record(tmp_path / name, rec)
    return rec


@pytest.fixture
def runs(tmp_path):
    record(tmp_path, "dense", "dense", "dense", 0.0, 0.970)
    record(tmp_path, "pat-90-s0", "pat", "agp+magnitude+global", 0.9, 0.972, seed=0)
    record(tmp_path, "pat-90-s1", "pat", "agp+magnitude+global", 0.9, 0.976, seed=1)
    record(tmp_path, "pat-95", "pat", "agp+magnitude+global", 0.95, 0.960)
    record(tmp_path, "mag-90", "post:magnitude", "post:magnitude", 0.9, 0.640)
    record(tmp_path, "mag-95", "post:magnitude", "post:magnitude", 0.95, 0.390)
    record(tmp_path, "iter-95", "post:iterative", "post:iterative", 0.95, 0.975, steps=1250)
    record(tmp_path, "broken", "post:gradient", "post:gradient", 0.9, 0.0, status="failed", error="RuntimeError: boom")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "result.json").write_text('{"method": "pat", "schema_ver')  # half-written
    return tmp_path


def test_rows_cells_pooling_and_best(runs):
    records, skipped = report.load_records([runs])
    assert len(skipped) == 1 and "corrupt" in skipped[0]
    comparison = report.compare(records)
    (group,) = comparison.groups
    assert group.columns == [0.9, 0.95] and group.dense_value == 0.970
    assert [row.label for row in group.ordered_rows()] == ["PAT agp+magnitude+global", "post:magnitude", "post:iterative"]
    pat = group.rows["PAT agp+magnitude+global"].cells[0.9]
    assert pat.n == 2 and pat.mean == pytest.approx(0.974) and pat.std == pytest.approx(0.0028284, abs=1e-6)
    assert report.cell_text(pat, group, row_dense_value(group.rows["PAT agp+magnitude+global"])) == "97.4±0.3 (+0.4)"
    assert group.best(0.9) == pytest.approx(0.974) and group.best(0.95) == pytest.approx(0.975)  # iterative wins at 95%
    assert group.rows["post:iterative"].steps_text() == "1,250"
    assert [r.status for r in comparison.not_ok] == ["failed"]


def test_a_run_reached_twice_or_copied_counts_once(cli, runs):
    records, skipped = report.load_records([runs, runs, runs / "pat-95" / "result.json"])
    assert len(records) == 8 and len(skipped) == 1  # the half-written one, warned about once
    shutil.copytree(runs / "pat-90-s1", runs / "pat-90-s1-copy")
    code, out, err = cli("compare", str(runs), str(runs / "pat-90-s0"), "--format", "json")
    assert code == 0
    assert [line for line in err.splitlines() if "same run" in line] == [
        f"warning: skipping {runs}/pat-90-s1-copy/result.json: the same run (run_id "
        f"{json.loads((runs / 'pat-90-s1' / 'result.json').read_text())['run_id']}) as {runs}/pat-90-s1/result.json"]
    cells = {(r["row"], r["target_sparsity"]): (r["n"], r["std"]) for r in json.loads(out)["rows"]}
    assert cells[("PAT agp+magnitude+global", 0.9)] == (2, pytest.approx(0.0028284, abs=1e-6))
    assert cells[("PAT agp+magnitude+global", 0.95)] == (1, None) and cells[("dense", 0.0)][0] == 1  # one run: no std


@pytest.mark.parametrize(
    "damage, why",
    [
        ({"schema_version": "1"}, "schema_version: expected an integer, got '1'"),
        ({"metrics": [1, 2]}, "metrics: expected a mapping"),
        ({"metrics": {"test": {"accuracy": "high"}}}, "metrics.test.accuracy: expected a number, got 'high'"),
        ({"target_sparsity": "abc"}, "target_sparsity: expected a number"),
        ({"metrics": {}}, "a finished run without its accuracy metric"),
        # free-form parts compare reads: each was a traceback (AttributeError, TypeError in fmean, unhashable list)
        ({"dense_reference": {"run_id": "zz", "metrics": "oops"}}, "dense_reference.metrics: expected a mapping"),
        ({"dense_reference": {"metrics": {"test": 3}}}, "dense_reference.metrics.test: expected a mapping"),
        ({"dense_reference": {"metrics": {"test": {"accuracy": "high"}}}}, "dense_reference.metrics.test.accuracy: expected a number"),
        ({"dense_reference": {"metrics": {"test": {"accuracy": float("nan")}}}}, "dense_reference.metrics.test.accuracy: not a finite"),
        ({"dense_reference": {"train_steps": "many"}}, "dense_reference.train_steps: expected"),
        ({"dense_reference": [1]}, "dense_reference: expected dict or null, got [1]"),
        ({"config": {"trainer": {"init_from": ["a"]}}}, "config.trainer.init_from: expected a single value, got ['a']"),
        ({"config": {"dataset": {"val_fold": [1]}}}, "config.dataset.val_fold: expected a single value, got [1]"),
    ],
)
def test_a_hand_edited_record_of_the_wrong_shape_is_skipped_with_its_reason(runs, damage, why):
    path = runs / "pat-95" / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **damage}))
    records, skipped = report.load_records([runs])
    assert len(records) == 7 and len(skipped) == 2  # the half-written one and this
    assert any("pat-95" in line and why in line for line in skipped), skipped
    assert report.compare(records).groups[0].columns == [0.9, 0.95]  # iterative still has 95%


def test_output_and_plot_paths_that_cannot_be_written_are_one_line_errors_before_any_work(cli, runs):
    (runs / "a-file").write_text("")
    for option, path, why in (("--output", runs, "is a directory; allowed: a file path"),
                              ("--output", runs / "a-file" / "table.txt", "a-file is a file, so"),
                              ("--plot", runs / "curves", "'curves' has no image extension; allowed: a file ending in .png")):
        code, out, err = cli("compare", str(runs), option, str(path))
        assert code == 2 and err.startswith(f"error: {option}: ") and why in err, err
        assert len(err.strip().splitlines()) == 1 and out == ""
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith(".")) == []  # no probe or partial file left


def test_output_never_replaces_a_runs_own_file(cli, runs):
    record = runs / "pat-90-s1" / "result.json"
    before = record.read_text()
    code, out, err = cli("compare", str(runs), "--output", str(record))
    assert code == 2 and err.strip() == "error: --output: result.json is the name of a run's own file; allowed: another file name"
    assert record.read_text() == before and out == ""


def test_a_record_that_is_not_text_is_skipped_with_its_reason(runs):
    (runs / "junk").mkdir()
    (runs / "junk" / "result.json").write_bytes(bytes(range(128, 256)) * 3)
    records, skipped = report.load_records([runs])
    assert any("junk/result.json: not a readable record (UnicodeDecodeError" in line for line in skipped), skipped


def test_lower_is_better_for_loss(runs):
    records, _ = report.load_records([runs])
    (group,) = report.compare(records, metric="loss").groups
    assert not group.higher_is_better
    assert group.best(0.95) == pytest.approx(1 - 0.975)  # the lowest loss


def test_cli_table_csv_json_markdown_and_plot(cli, runs):
    code, out, err = cli("compare", str(runs))
    assert code == 0
    assert "skipping" in err and "corrupt" in err and len([l for l in err.splitlines() if "warning" in l]) == 1
    lines = out.splitlines()
    pat_line = next(l for l in lines if "PAT agp+magnitude+global" in l)
    assert "97.4±0.3 (+0.4)" in pat_line and "96.0 (-1.0)" in pat_line
    mag_line = next(l for l in lines if "post:magnitude" in l)
    assert "64.0 (-33.0)" in mag_line and "39.0 (-58.0)" in mag_line
    assert "runs that did not finish ok" in out and "RuntimeError: boom" in out

    code, out, _ = cli("compare", str(runs), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    by_key = {(r["row"], float(r["target_sparsity"])): r for r in rows}
    assert float(by_key[("post:magnitude", 0.9)]["mean"]) == pytest.approx(0.64)
    assert int(by_key[("PAT agp+magnitude+global", 0.9)]["n"]) == 2
    assert float(by_key[("post:iterative", 0.95)]["delta_vs_dense"]) == pytest.approx(0.005)
    # steps as numbers (the table's "1,250" was written as text)
    assert (by_key[("post:iterative", 0.95)]["train_steps_min"], by_key[("post:iterative", 0.95)]["train_steps_max"]) == ("1250", "1250")

    code, out, _ = cli("compare", str(runs), "--format", "json", "--split", "val")
    data = json.loads(out)
    assert {r["row"] for r in data["rows"]} == {"dense", "PAT agp+magnitude+global", "post:magnitude", "post:iterative"}
    assert data["rows"][0]["split"] == "val" and data["not_ok"][0]["status"] == "failed"
    assert {(r["row"], r["train_steps_min"], r["train_steps_max"]) for r in data["rows"] if r["row"] == "post:iterative"} == {
        ("post:iterative", 1250, 1250)}

    code, out, _ = cli("compare", str(runs), "--format", "markdown", "--output", str(runs / "table.md"),
                       "--plot", str(runs / "figures" / "curves.png"))  # a folder that does not exist yet
    assert code == 0
    assert "| post:iterative | 1,250 | 1 | - | **97.5 (+0.5)** |" in (runs / "table.md").read_text()
    png = (runs / "figures" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_output_of_the_table_goes_to_the_file_only(cli, runs):
    code, out, _ = cli("compare", str(runs), "--output", str(runs / "table.txt"))
    assert code == 0 and out == f"wrote {runs / 'table.txt'}\n"
    text = (runs / "table.txt").read_text()
    assert "97.4±0.3 (+0.4)" in next(line for line in text.splitlines() if "PAT agp+magnitude+global" in line)
    assert "runs that did not finish ok" in text and "RuntimeError: boom" in text and "\x1b[" not in text


def test_csv_carries_the_runs_that_did_not_finish_as_rows_with_their_status_and_error(cli, runs):
    """With the sparsity they reached, which their records hold: the csv left it empty."""
    code, out, _ = cli("compare", str(runs), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["failed"]
    assert rows[-1] == {"model": "mlp", "dataset": "digits", "config_hash": "h1", "method": "post:gradient",
                        "row": "post:gradient", "target_sparsity": "0.9", "achieved_sparsity": "0.9", "split": "", "metric": "",
                        "mean": "", "std": "", "n": "", "delta_vs_dense": "", "higher_is_better": "", "train_steps_min": "",
                        "train_steps_max": "",
                        "status": "failed", "run_dir": str(runs / "broken"), "error": "RuntimeError: boom"}


@pytest.fixture
def only_failed(tmp_path):
    record(tmp_path, "broken", "post:gradient", "post:gradient", 0.9, 0.0, status="failed", error="RuntimeError: boom\nin | x")
    record(tmp_path, "stopped", "pat", "agp+magnitude+global", 0.95, 0.0, status="interrupted", error="KeyboardInterrupt")
    return tmp_path


def test_a_folder_of_failed_runs_lists_them_says_so_and_exits_1(cli, only_failed):
    why = f"error: nothing to compare: no run under {only_failed} finished ok with a test metric (2 did not finish ok, listed above)"
    code, out, err = cli("compare", str(only_failed))
    assert code == 1 and err.strip() == why
    assert "runs that did not finish ok" in out and "RuntimeError: boom" in out and "KeyboardInterrupt" in out
    code, out, err = cli("compare", str(only_failed), "--format", "csv")
    assert code == 1 and err.strip() == why
    assert [(r["row"], r["status"], r["error"]) for r in csv.DictReader(io.StringIO(out))] == [
        ("post:gradient", "failed", "RuntimeError: boom\nin | x"), ("PAT agp+magnitude+global", "interrupted", "KeyboardInterrupt")]
    code, out, err = cli("compare", str(only_failed), "--format", "json")
    assert code == 1 and err.strip() == why
    assert json.loads(out)["rows"] == [] and [r["status"] for r in json.loads(out)["not_ok"]] == ["failed", "interrupted"]
    code, out, err = cli("compare", str(only_failed), "--format", "markdown")
    assert code == 1 and err.strip() == why
    assert out.splitlines()[4:] == [f"| failed | post:gradient | 0.9 | {only_failed / 'broken'} | RuntimeError: boom in \\| x |",
                                    f"| interrupted | PAT agp+magnitude+global | 0.95 | {only_failed / 'stopped'} | KeyboardInterrupt |"]


def test_a_folder_of_failed_runs_has_nothing_to_plot(cli, only_failed):
    code, out, err = cli("compare", str(only_failed), "--output", str(only_failed / "t.md"), "--format", "markdown",
                         "--plot", str(only_failed / "curves.png"))
    assert code == 1 and out == f"wrote {only_failed / 't.md'}\n"
    assert err.strip() == (f"error: nothing to compare: no run under {only_failed} finished ok with a test metric (2 did not "
                           f"finish ok, listed in {only_failed / 't.md'}); nothing to plot, so {only_failed / 'curves.png'} "
                           "was not written")
    assert "RuntimeError: boom" in (only_failed / "t.md").read_text()
    assert sorted(p.name for p in only_failed.iterdir()) == ["broken", "stopped", "t.md"]  # no image, no partial one


def test_compare_reports_missing_or_empty_paths(cli, tmp_path):
    code, _, err = cli("compare", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli("compare", str(tmp_path))
    assert code == 2 and "no run records" in err
    code, _, err = cli("compare", str(tmp_path), "--split", "train")
    assert code == 2 and "--split" in err
    code, _, err = cli("compare", str(tmp_path), "--format", "xml")  # Typer's own check printed a box of many lines
    assert code == 2 and err.strip() == "error: --format: 'xml' is not allowed; allowed: table, csv, markdown, json"


def test_compare_names_the_metrics_the_records_hold_for_a_wrong_one(cli, runs):
    code, out, err = cli("compare", str(runs), "--metric", "acuracy")
    assert code == 2 and err.strip().splitlines()[-1] == "error: --metric: 'acuracy' is in no test record; allowed: accuracy, loss"
    code, out, _ = cli("compare", str(runs), "--metric", "loss", "--format", "json")
    assert code == 0 and {r["metric"] for r in json.loads(out)["rows"]} == {"loss"}


def test_pat_settings_a_baseline_or_dense_run_never_reads_do_not_split_its_row(tmp_path):
    """prune-post baseline=magnitude scorer=movement ran exactly as without scorer=movement: one row, pooled."""
    plain = {"baseline": {"name": "magnitude"}, "scorer": {"name": "magnitude"}, "pruning": {"mode": "unstructured"}}
    movement = {**plain, "scorer": {"name": "movement"}, "schedule": {"name": "cubic"}, "pruning": {"mode": "unstructured", "frequency": 7}}
    record(tmp_path, "a", "post:magnitude", "post:magnitude", 0.9, 0.60, seed=0, config=plain)
    record(tmp_path, "b", "post:magnitude", "post:magnitude", 0.9, 0.70, seed=1, config=movement)
    record(tmp_path, "c", "dense", "dense", 0.0, 0.97, seed=0, config={"pruning": {"mode": "none"}})
    record(tmp_path, "d", "dense", "dense", 0.0, 0.95, seed=1, config={"pruning": {"mode": "none"}, "scorer": {"name": "movement"}})
    record(tmp_path, "e", "pat", "agp+magnitude+global", 0.9, 0.96, config=plain)
    record(tmp_path, "f", "pat", "agp+magnitude+global", 0.9, 0.94, config={**plain, "pruning": {"mode": "unstructured", "frequency": 7}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert group.rows["post:magnitude"].cells[0.9].n == 2 and group.dense.cells[0.0].n == 2
    pat_rows = [label for label in group.rows if label.startswith("PAT")]
    assert len(pat_rows) == 2  # PAT reads pruning.frequency: two recipes, told apart


def test_each_row_is_compared_with_the_dense_run_trained_like_it_or_that_it_started_from(tmp_path):
    """Two dense setups: the one with more runs is the dense row, but a row trained (or pruned from) the other one
    must show its difference to that one, not to the dense row."""
    short, long = {"trainer": {"epochs": 5}}, {"trainer": {"epochs": 10}}
    record(tmp_path, "d5-s0", "dense", "dense", 0.0, 0.70, seed=0, config=short, run_id="d5a")
    record(tmp_path, "d5-s1", "dense", "dense", 0.0, 0.74, seed=1, config=short, run_id="d5b")
    record(tmp_path, "d10", "dense", "dense", 0.0, 0.88, config=long, run_id="d10")
    record(tmp_path, "pat10", "pat", "agp+magnitude+global", 0.8, 0.85, config=long, run_id="p10")
    record(tmp_path, "mag10", "post:magnitude", "post:magnitude", 0.8, 0.47, config=long, run_id="m10",
           dense_reference={"run_id": "d10", "run_dir": str(tmp_path / "d10"), "metrics": {"test": {"accuracy": 0.88}}})
    records, _ = report.load_records([tmp_path])
    (group,) = report.compare(records).groups
    assert group.dense.label == "dense [trainer.epochs=5]" and group.dense_value == pytest.approx(0.72)
    rows = {row.label: row for row in group.ordered_rows()}
    assert row_dense_value(rows["PAT agp+magnitude+global"]) == pytest.approx(0.88)  # trained like the 10-epoch dense run
    assert report.cell_text(rows["post:magnitude"].cells[0.8], group, row_dense_value(rows["post:magnitude"])) == "47.0 (-41.0)"
    assert {r["row"]: r["delta_vs_dense"] for r in report.long_rows(report.compare(records))}["post:magnitude"] == pytest.approx(-0.41)


def test_a_repeat_of_the_same_recipe_and_seed_is_counted_once_with_a_warning(cli, runs):
    """Two runs of seed 0 (a rerun, or baselines that all took their dense run's seed) are one sample, not two."""
    record(runs, "pat-90-s0-rerun", "pat", "agp+magnitude+global", 0.9, 0.972, seed=0)
    code, out, err = cli("compare", str(runs), "--format", "json")
    assert code == 0, err
    cells = {(r["row"], r["target_sparsity"]): r["n"] for r in json.loads(out)["rows"]}
    assert cells[("PAT agp+magnitude+global", 0.9)] == 2  # seeds 0 and 1
    assert f"warning: {runs}/pat-90-s0-rerun: the same recipe, sparsity and seed as {runs}/pat-90-s0, counted once" in " ".join(err.split())


def test_a_record_with_a_metric_that_is_not_finite_is_skipped_with_its_reason(runs):
    path = runs / "pat-95" / "result.json"
    data = json.loads(path.read_text())
    data["metrics"]["test"]["accuracy"] = float("nan")
    path.write_text(json.dumps(data))
    records, skipped = report.load_records([runs])
    assert any("pat-95/result.json: a finished run whose test.accuracy is not a finite number" in line for line in skipped)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 5.0, -0.1])
@pytest.mark.parametrize("key", ["target_sparsity", "achieved_sparsity"])
def test_a_record_whose_sparsity_is_no_fraction_is_skipped_with_its_reason(runs, key, value):
    """A hand-edited NaN target was taken in, and compare --format json then wrote NaN, which is not JSON."""
    path = runs / "pat-95" / "result.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    records, skipped = report.load_records([runs])
    assert any(f"pat-95/result.json: {key} {value!r} is not a fraction in 0..1" in line for line in skipped), skipped
    assert all(r.run_dir != str(runs / "pat-95") for r in records)


def test_the_same_seed_started_from_other_weights_is_another_sample(tmp_path):
    """Baselines of one seed pruned from two different dense runs, or PAT runs continued from two runs."""
    for name, dense in (("mag-a", "dA"), ("mag-b", "dB")):
        record(tmp_path, name, "post:magnitude", "post:magnitude", 0.9, 0.1 if dense == "dA" else 0.17,
               dense_reference={"run_id": dense, "run_dir": str(tmp_path / dense), "metrics": {"test": {"accuracy": 0.97}}})
    for name, start in (("pat-a", "/runs/a"), ("pat-b", "/runs/b")):
        record(tmp_path, name, "pat", "agp+magnitude+global", 0.9, 0.9, config={"trainer": {"init_from": start}})
    records, _ = report.load_records([tmp_path])
    comparison = report.compare(records)
    (group,) = comparison.groups
    assert [line for line in comparison.repeats if "the same recipe" in line] == []  # (the two dense runs are one seed)
    assert group.rows["post:magnitude"].cells[0.9].n == 2 and group.rows["PAT agp+magnitude+global"].cells[0.9].n == 2


def test_baselines_of_two_copies_of_one_dense_run_are_one_sample_as_the_copies_are(tmp_path):
    """The same dense training and seed run twice (byte-identical): the dense row counted it once, yet the
    baselines pruned from each copy counted as two samples, with a std of 0."""
    for name in ("dA", "dB"):
        record(tmp_path, name, "dense", "dense", 0.0, 0.97, run_id=name)
    for name, dense in (("mag-a", "dA"), ("mag-b", "dB")):
        record(tmp_path, name, "post:magnitude", "post:magnitude", 0.9, 0.5, run_id=name,
               dense_reference={"run_id": dense, "run_dir": str(tmp_path / dense), "metrics": {"test": {"accuracy": 0.97}}})
    records, _ = report.load_records([tmp_path])
    comparison = report.compare(records)
    (group,) = comparison.groups
    assert group.dense.cells[0.0].n == 1 and group.rows["post:magnitude"].cells[0.9].n == 1
    assert sorted(line.split(":")[0].rsplit("/", 1)[1] for line in comparison.repeats) == ["dB", "mag-b"]


def test_baselines_of_two_copies_of_a_dense_run_not_given_to_compare_are_one_sample(tmp_path):
    """The dense row counts cited-only copies (same training and seed) once; their baselines counted twice."""
    for name, dense in (("mag-a", "dA"), ("mag-b", "dB")):
        record(tmp_path, name, "post:magnitude", "post:magnitude", 0.9, 0.5, run_id=name, extra={"baseline": {"name": "magnitude"}},
               dense_reference={"run_id": dense, "run_dir": str(tmp_path / dense), "metrics": {"test": {"accuracy": 0.97}}})
    records, _ = report.load_records([tmp_path])
    (group,) = report.compare(records).groups
    assert group.dense.cells[0.0].n == 1 and group.rows["post:magnitude"].cells[0.9].n == 1


def cited_dense(dense, steps=40):
    return {"run_id": dense, "run_dir": f"/elsewhere/{dense}", "metrics": {"test": {"accuracy": 0.97}}, "train_steps": steps}


def test_copies_of_a_dense_run_are_one_start_whether_given_to_compare_or_cited_and_in_any_order(tmp_path):
    """Baselines of a dense run given to compare and of its copy known only by citation counted twice; PAT runs
    given the same dense= were repeats or two samples depending on whether a baseline citing it came first."""
    baseline = {"baseline": {"name": "magnitude"}}
    record(tmp_path, "d0", "dense", "dense", 0.0, 0.97, run_id="d0", steps=40)
    record(tmp_path, "b0", "post:magnitude", "post:magnitude", 0.9, 0.5, run_id="b0", extra=baseline, dense_reference=cited_dense("d0"))
    record(tmp_path, "b0b", "post:magnitude", "post:magnitude", 0.9, 0.5, run_id="b0b", extra=baseline, dense_reference=cited_dense("d0b"))
    for name in ("p_a", "p_c"):
        record(tmp_path, name, "pat", "agp+magnitude+global", 0.9, 0.8, run_id=name, dense_reference=cited_dense("e0"))
    record(tmp_path, "p_b", "post:magnitude", "post:magnitude", 0.8, 0.6, run_id="p_b", extra=baseline, dense_reference=cited_dense("e0"))
    records, _ = report.load_records([tmp_path])
    for ordered in (records, records[::-1]):
        (group,) = report.compare(ordered).groups
        assert group.rows["post:magnitude"].cells[0.9].n == 1
        assert group.rows["PAT agp+magnitude+global"].cells[0.9].n == 1


def test_baselines_of_a_dense_run_and_of_one_continued_from_it_stay_two_samples(tmp_path):
    """Same training settings and seed, but the continued one trained 80 steps in all: other starting weights."""
    baseline = {"baseline": {"name": "magnitude"}}
    for name, dense, steps in (("b0", "d0", 40), ("bi", "di", 80)):
        record(tmp_path, name, "post:magnitude", "post:magnitude", 0.5, 0.88 if steps == 40 else 0.91, run_id=name,
               extra=baseline, dense_reference=cited_dense(dense, steps))
    records, _ = report.load_records([tmp_path])
    (group,) = report.compare(records).groups
    assert group.rows["post:magnitude"].cells[0.5].n == 2


def test_a_seed_a_run_does_not_read_sets_no_samples_apart(tmp_path):
    """scorer.seed is the run's seed by default: a baseline or dense run given scorer=random and one given
    scorer=magnitude are the same run (both ignore the scorer), yet counted as two samples with a std of 0."""
    for name, scorer in (("mag-r", {"name": "random", "seed": 0}), ("mag-m", {"name": "magnitude"})):
        record(tmp_path, name, "post:magnitude", "post:magnitude", 0.9, 0.5, run_id=name, config={"scorer": scorer})
    for name, scorer in (("pat-r0", {"name": "random", "seed": 0}), ("pat-r1", {"name": "random", "seed": 1})):
        record(tmp_path, name, "pat", "agp+random+global", 0.9, 0.4, run_id=name, config={"scorer": scorer})
    records, _ = report.load_records([tmp_path])
    (group,) = report.compare(records).groups
    assert group.rows["post:magnitude"].cells[0.9].n == 1
    assert group.rows["PAT agp+random+global"].cells[0.9].n == 2  # PAT reads it: two draws of the random masks


def test_a_cited_dense_run_pools_only_with_dense_runs_trained_the_same_way(tmp_path):
    short, long = {"trainer": {"epochs": 2}}, {"trainer": {"epochs": 3}}
    record(tmp_path, "d-s0", "dense", "dense", 0.0, 0.80, seed=0, config=short, run_id="d0")
    record(tmp_path, "d-s1", "dense", "dense", 0.0, 0.90, seed=1, config=short, run_id="d1")
    record(tmp_path, "pat", "pat", "agp+magnitude+global", 0.8, 0.86, config=short, run_id="p")
    # the epochs=3 dense run is not among the records, only cited by a baseline trained at epochs=3
    record(tmp_path, "mag3", "post:magnitude", "post:magnitude", 0.9, 0.50, config=long, run_id="m3",
           dense_reference={"run_id": "d3", "run_dir": str(tmp_path / "d3"), "metrics": {"test": {"accuracy": 0.99}}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert group.dense.cells[0.0].values == [0.80, 0.90]  # not the cited 0.99 of another training
    assert row_dense_value(group.rows["PAT agp+magnitude+global"]) == pytest.approx(0.85)
    assert row_dense_value(group.rows["post:magnitude"]) == pytest.approx(0.99)  # against the run it started from


def test_the_reference_dense_competes_for_best_in_the_dense_column(tmp_path):
    record(tmp_path, "d-s0", "dense", "dense", 0.0, 0.84, seed=0, config={"trainer": {"epochs": 2}})
    record(tmp_path, "d-s1", "dense", "dense", 0.0, 0.85, seed=1, config={"trainer": {"epochs": 2}})
    record(tmp_path, "d-short", "dense", "dense", 0.0, 0.71, config={"trainer": {"epochs": 1}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert group.dense.cells[0.0].n == 2 and group.best(0.0) == pytest.approx(0.845)  # the shorter dense row is worse
    (shorter,) = [line for line in report.to_markdown(report.compare(report.load_records([tmp_path])[0])).splitlines()
                  if "epochs=1" in line]
    assert shorter.endswith("| 71.0 (-13.5) |")  # not in bold


def test_a_setting_missing_from_an_older_record_keeps_both_rows(tmp_path):
    record(tmp_path, "new", "pat", "agp+magnitude+global", 0.9, 0.90, seed=0, config={"trainer": {"grad_clip": None}})
    record(tmp_path, "old", "pat", "agp+magnitude+global", 0.9, 0.70, seed=1, config={"trainer": {}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert sorted(group.rows) == ["PAT agp+magnitude+global [trainer.grad_clip=(unset)]",
                                  "PAT agp+magnitude+global [trainer.grad_clip=None]"]
    assert sorted(row.cells[0.9].values[0] for row in group.rows.values()) == [0.70, 0.90]


def test_settings_that_print_alike_still_give_two_rows(tmp_path):
    record(tmp_path, "int", "pat", "agp+magnitude+global", 0.9, 0.90, config={"trainer": {"tag": 1}})
    record(tmp_path, "str", "pat", "agp+magnitude+global", 0.9, 0.70, config={"trainer": {"tag": "1"}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert len(group.rows) == 2 and sorted(r.cells[0.9].values[0] for r in group.rows.values()) == [0.70, 0.90]


def test_runs_without_the_metric_shown_are_named_not_dropped_silently(cli, runs):
    record(runs, "no-loss", "pat", "agp+magnitude+global", 0.9, 0.980, seed=2)
    path = runs / "no-loss" / "result.json"
    data = json.loads(path.read_text())
    del data["metrics"]["test"]["loss"]  # as a record of an older patcli, or a run of a model without that metric
    path.write_text(json.dumps(data))
    code, out, err = cli("compare", str(runs), "--metric", "loss", "--format", "json")
    assert code == 0
    assert err.count("left out") == 1 and f"{runs / 'no-loss'}: no test loss in its record, left out" in err
    cells = {(r["row"], r["target_sparsity"]): r["n"] for r in json.loads(out)["rows"]}
    assert cells[("PAT agp+magnitude+global", 0.9)] == 2  # the two that have it
    comparison = report.compare(report.load_records([runs])[0], "loss", "val")  # no val record has a loss
    assert comparison.groups == [] and len(comparison.without_metric) == 8


def test_a_labelled_baseline_row_keeps_the_baselines_order(tmp_path):
    for name, method, epochs in (("it", "post:iterative", 2), ("it3", "post:iterative", 3), ("mag", "post:magnitude", 2),
                                 ("mag3", "post:magnitude", 3)):
        record(tmp_path, name, method, method, 0.9, 0.5, config={"trainer": {"epochs": epochs}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert [row.method for row in group.ordered_rows()] == ["post:magnitude"] * 2 + ["post:iterative"] * 2


def test_records_without_the_split_are_nothing_to_compare_not_no_records(cli, tmp_path):
    record(tmp_path, "a", "pat", "agp+magnitude+global", 0.9, 0.9)
    data = json.loads((tmp_path / "a" / "result.json").read_text())
    data["metrics"] = {"test": data["metrics"]["test"]}
    (tmp_path / "a" / "result.json").write_text(json.dumps(data))
    code, out, err = cli("compare", str(tmp_path), "--split", "val")
    assert code == 1 and "no run records" not in err and "nothing to compare" in out + err, (out, err)
    assert "no val accuracy in its record, left out" in err


def test_dense_runs_known_only_by_citation_stay_apart_per_training_and_serve_rows_trained_alike(tmp_path):
    def cite(dense_id, accuracy):
        return {"run_id": dense_id, "run_dir": str(tmp_path / dense_id), "metrics": {"test": {"accuracy": accuracy}}}

    two, three = {"trainer": {"epochs": 2}}, {"trainer": {"epochs": 3}}
    record(tmp_path, "pat2", "pat", "agp+magnitude+global", 0.8, 0.80, config=two)
    record(tmp_path, "mag2", "post:magnitude", "post:magnitude", 0.8, 0.60, config=two, dense_reference=cite("d2", 0.84))
    for seed, accuracy in enumerate((0.88, 0.89, 0.90)):
        record(tmp_path, f"mag3-{seed}", "post:magnitude", "post:magnitude", 0.8, 0.70, seed=seed, config=three,
               dense_reference=cite(f"d3-{seed}", accuracy))
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert group.dense.label == "dense [trainer.epochs=3]" and group.dense.cells[0.0].values == [0.88, 0.89, 0.90]
    assert row_dense_value(group.rows["PAT agp+magnitude+global"]) == pytest.approx(0.84)  # trained at epochs=2
    assert row_dense_value(group.rows["post:magnitude [trainer.epochs=2]"]) == pytest.approx(0.84)
    assert row_dense_value(group.rows["post:magnitude [trainer.epochs=3]"]) == pytest.approx(0.89)


def test_a_cached_dense_reference_pools_with_a_dense_run_trained_by_hand(tmp_path):
    """prune-post's cached dense run records only the pruning keys a dense run reads; `train pruning=none` records all."""
    by_hand = {"pruning": {"mode": "none", "frequency": 50, "masking": "inplace", "max_layer_sparsity": 0.99}}
    record(tmp_path, "by-hand", "dense", "dense", 0.0, 0.90, seed=0, config=by_hand)
    record(tmp_path, "cached", "dense", "dense", 0.0, 0.92, seed=1, config={"pruning": {"mode": "none"}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert group.rows == {} and group.dense.label == "dense" and group.dense.cells[0.0].values == [0.90, 0.92]


def cite(tmp_path, dense_id, accuracy):
    return {"run_id": dense_id, "run_dir": str(tmp_path / dense_id), "metrics": {"test": {"accuracy": accuracy}}}


def test_a_dense_run_counted_once_as_a_repeat_is_not_counted_again_through_the_baselines_citing_it(tmp_path):
    """The repeat's baselines cited it: its value came back as a dense run known only by citation (n=3, not 2), and
    which twin was dropped depended on the order of the paths."""
    record(tmp_path, "dense-s0", "dense", "dense", 0.0, 0.872, seed=0, run_id="first")
    record(tmp_path, "dense-s0-again", "dense", "dense", 0.0, 0.872, seed=0, run_id="again")
    record(tmp_path, "dense-s1", "dense", "dense", 0.0, 0.861, seed=1, run_id="s1")
    record(tmp_path, "mag-s0", "post:magnitude", "post:magnitude", 0.9, 0.40, seed=0, dense_reference=cite(tmp_path, "again", 0.872))
    record(tmp_path, "mag-s1", "post:magnitude", "post:magnitude", 0.9, 0.50, seed=1, dense_reference=cite(tmp_path, "s1", 0.861))
    records, _ = report.load_records([tmp_path])
    for ordered in (records, records[::-1]):
        comparison = report.compare(ordered)
        (group,) = comparison.groups
        assert group.dense.cells[0.0].values in ([0.872, 0.861], [0.861, 0.872])
        assert row_dense_value(group.rows["post:magnitude"]) == pytest.approx((0.872 + 0.861) / 2)
        assert len(comparison.repeats) == 1


def test_each_cell_differs_from_the_dense_runs_its_own_runs_started_from(tmp_path):
    """A row pooled the dense runs of all its cells: a cell of seed 1 alone was compared with seeds 0 and 1, and a
    copy of seed 0's dense run cited by one cell counted seed 0 twice for the others."""
    for seed, accuracy in enumerate((0.872, 0.861, 0.850)):
        record(tmp_path, f"dense-s{seed}", "dense", "dense", 0.0, accuracy, seed=seed, run_id=f"d{seed}")
        record(tmp_path, f"mag50-s{seed}", "post:magnitude", "post:magnitude", 0.5, 0.85, seed=seed,
               dense_reference=cite(tmp_path, f"d{seed}", accuracy))
    record(tmp_path, "dense-s0-again", "dense", "dense", 0.0, 0.872, seed=0, run_id="again")  # trained again by hand
    record(tmp_path, "mag70-s0", "post:magnitude", "post:magnitude", 0.7, 0.84, seed=0, dense_reference=cite(tmp_path, "again", 0.872))
    record(tmp_path, "mag90-s1", "post:magnitude", "post:magnitude", 0.9, 0.44, seed=1, dense_reference=cite(tmp_path, "d1", 0.861))
    comparison = report.compare(report.load_records([tmp_path])[0])
    (group,) = comparison.groups
    cells = group.rows["post:magnitude"].cells
    assert group.dense.cells[0.0].values == [0.872, 0.861, 0.850]
    assert cells[0.5].dense_value == pytest.approx((0.872 + 0.861 + 0.850) / 3)
    assert cells[0.7].dense_value == pytest.approx(0.872) and cells[0.9].dense_value == pytest.approx(0.861)
    deltas = {r["target_sparsity"]: r["delta_vs_dense"] for r in report.long_rows(comparison) if r["method"] == "post:magnitude"}
    assert deltas == pytest.approx({0.5: 0.85 - 0.861, 0.7: 0.84 - 0.872, 0.9: 0.44 - 0.861})
    assert "| **44.0 (-42.1)** |" in report.to_markdown(comparison)  # -42.4 against every dense run the row cites


def test_a_table_of_dense_runs_alone_shows_their_value(tmp_path):
    for seed, accuracy in enumerate((0.87, 0.88)):
        record(tmp_path, f"dense-s{seed}", "dense", "dense", 0.0, accuracy, seed=seed)
    comparison = report.compare(report.load_records([tmp_path])[0])
    assert comparison.groups[0].columns == [0.0]
    assert "| method | steps | runs | 0% |" in report.to_markdown(comparison)
    assert "| dense | 1,000 | 2 | **87.5±0.7** |" in report.to_markdown(comparison)


def test_a_dense_seed_known_by_hand_and_by_citation_is_counted_once(tmp_path):
    """A dense run of seed 0 trained by hand, and baselines citing their own (cached) dense runs of seeds 0 and 1."""
    record(tmp_path, "dense-by-hand", "dense", "dense", 0.0, 0.872, seed=0, run_id="hand")
    for seed, accuracy in ((0, 0.872), (1, 0.861)):
        record(tmp_path, f"mag-s{seed}", "post:magnitude", "post:magnitude", 0.9, 0.4, seed=seed,
               dense_reference=cite(tmp_path, f"cached-{seed}", accuracy), extra={"baseline": {"name": "magnitude"}})
    comparison = report.compare(report.load_records([tmp_path])[0])
    (group,) = comparison.groups
    assert sorted(group.dense.cells[0.0].values) == [0.861, 0.872]
    assert any("cached-0" in line and "counted once" in line for line in comparison.repeats)


def test_a_baselines_difference_is_to_the_dense_runs_it_started_from_not_to_other_seeds(tmp_path):
    """The cited run's row pools seeds the baseline never started from: its mean moved the difference."""
    for seed, accuracy in enumerate((0.872, 0.861, 0.80)):
        record(tmp_path, f"dense-s{seed}", "dense", "dense", 0.0, accuracy, seed=seed, run_id=f"d{seed}")
    record(tmp_path, "structured", "post:structured", "post:structured", 0.5, 0.866, dense_reference=cite(tmp_path, "d0", 0.872))
    records, _ = report.load_records([tmp_path])
    (group,) = report.compare(records).groups
    assert group.dense_value == pytest.approx(0.844333, abs=1e-6)
    row = group.rows["post:structured"]
    assert row_dense_value(row) == pytest.approx(0.872)
    assert report.cell_text(row.cells[0.5], group, row_dense_value(row)) == "86.6 (-0.6)"


def test_the_reference_dense_is_chosen_and_marked_the_same_whatever_the_order_of_the_paths(tmp_path):
    """Two dense setups of one run each: the reference was whichever came first; leading the 0% column, it was the
    only one never marked, so no cell of that column was bold."""
    record(tmp_path, "cv", "dense", "dense", 0.0, 0.886, config={"dataset": {"val_fold": 0}})
    record(tmp_path, "fixed", "dense", "dense", 0.0, 0.856, config={"dataset": {}})
    records, _ = report.load_records([tmp_path])
    for ordered in (records, records[::-1]):
        comparison = report.compare(ordered)
        (group,) = comparison.groups
        assert group.dense.label == "dense [cross_validation=False]"  # the fixed split's, on a tie of runs
        markdown = report.to_markdown(comparison).splitlines()
        assert "| dense [cross_validation=False] | 1,000 | 1 | 85.6 |" in markdown
        assert "| dense [cross_validation=True] | 1,000 | 1 | **88.6 (+3.0)** |" in markdown
    record(tmp_path, "fixed-better", "dense", "dense", 0.0, 0.95, seed=1, config={"dataset": {}})
    markdown = report.to_markdown(report.compare(report.load_records([tmp_path])[0])).splitlines()
    assert "| dense [cross_validation=False] | 1,000 | 2 | **90.3±6.6** |" in markdown  # leading: marked


def test_dense_rows_are_labelled_only_by_settings_that_set_them_apart(tmp_path):
    """A dense run trained by hand records the pruning keys a cached one does not; they never split a dense row, so
    its label named them as "(unset)" beside the one setting that did."""
    by_hand = {"pruning": {"mode": "none", "frequency": 50, "masking": "inplace", "max_layer_sparsity": 0.99},
               "trainer": {"epochs": 3}}
    record(tmp_path, "by-hand", "dense", "dense", 0.0, 0.90, config=by_hand)
    record(tmp_path, "cached", "dense", "dense", 0.0, 0.92, seed=1, config={"pruning": {"mode": "none"}, "trainer": {"epochs": 2}})
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert sorted([group.dense.label, *group.rows]) == ["dense [trainer.epochs=2]", "dense [trainer.epochs=3]"]


def test_the_plot_may_not_replace_the_table_written_to_the_same_file(cli, runs):
    code, out, err = cli("compare", str(runs), "--output", str(runs / "same.png"), "--plot", str(runs / "same.png"))
    assert code == 2 and err.strip() == f"error: --plot: {runs / 'same.png'} is also --output; allowed: two different files"
    assert not (runs / "same.png").exists()


def test_output_may_not_replace_a_runs_config_snapshot_log_or_export(cli, runs):
    """Only result.json, metrics.jsonl and model.safetensors were protected: a table over .hydra/config.yaml made
    the run unexportable."""
    run = runs / "pat-95"
    for target in (run / ".hydra" / "config.yaml", run / "run.log", run / "export" / "table.md"):
        code, out, err = cli("compare", str(runs), "--output", str(target))
        assert code == 2 and err.strip() == f"error: --output: {target} is inside the run folder {run}; allowed: a file " \
                                            "outside run folders"
        assert not target.exists()


def test_a_pat_run_given_a_dense_reference_keeps_its_own_seed_so_its_dense_run_is_no_repeat(tmp_path):
    """Only a baseline records its dense run's seed; a PAT run given dense= keeps its own, so its cited run (seed 0)
    was dropped as a repeat of a dense run of seed 1."""
    record(tmp_path, "dense-s1", "dense", "dense", 0.0, 0.97, seed=1, run_id="d1")
    record(tmp_path, "pat-s1", "pat", "agp+magnitude+global", 0.9, 0.9, seed=1, dense_reference=cite(tmp_path, "d0", 0.95))
    comparison = report.compare(report.load_records([tmp_path])[0])
    (group,) = comparison.groups
    assert sorted(group.dense.cells[0.0].values) == [0.95, 0.97] and comparison.repeats == []


def test_settings_a_pat_run_did_not_apply_do_not_split_its_row(cli, tmp_path):
    """2:4 prunes every layer alike whatever allocation says, the alternating schedule updates where its phases
    start whatever pruning.frequency says, and evaluating more often changes no weight: runs that differ only there
    trained alike (byte-identical models at the same seed), but were rows of their own, labelled by those settings."""
    for name, seed, overrides in (("nm-global", 0, ["pruning=nm"]), ("nm-lamp", 1, ["pruning=nm", "allocation=lamp"]),
                                  ("ac-50", 0, ["schedule=alternating"]), ("ac-5", 1, ["schedule=alternating", "pruning.frequency=5"]),
                                  ("eval-1", 0, []), ("eval-5", 1, ["trainer.eval_every=5"])):
        code, out, err = cli("train", *TINY, f"seed={seed}", *overrides, f"hydra.run.dir={name}")
        assert code == 0, err
    (group,) = report.compare(report.load_records([tmp_path])[0]).groups
    assert sorted((label, cell.n) for label, row in group.rows.items() for cell in row.cells.values()) == [
        ("PAT agp+magnitude+global", 2), ("PAT agp+magnitude+uniform+nm", 2), ("PAT alternating+magnitude+global", 2)]


def test_every_row_of_a_plot_panel_has_its_own_colour_and_marker():
    """Colours repeat after 10 rows and every row had the same marker: row 11 looked like row 1 in the legend."""
    styles = report.line_styles(70)
    assert len({(s["color"], s["marker"]) for s in styles}) == 70


def test_a_baseline_given_an_init_from_it_ignores_is_a_repeat_of_the_same_baseline_without_it(tmp_path):
    """prune-post warns that trainer.init_from does not apply (a baseline starts from its dense run), yet compare
    took the unused path for another start: one run from one dense run and seed counted twice."""
    dense = cite(tmp_path, "d0", 0.97)
    record(tmp_path, "mag-a", "post:magnitude", "post:magnitude", 0.9, 0.711, dense_reference=dense,
           config={"baseline": {"name": "magnitude"}})
    record(tmp_path, "mag-b", "post:magnitude", "post:magnitude", 0.9, 0.711, dense_reference=dense,
           config={"baseline": {"name": "magnitude"}, "trainer": {"init_from": str(tmp_path / "d0")}})
    records, _ = report.load_records([tmp_path])
    comparison = report.compare(records)
    (group,) = comparison.groups
    assert group.rows["post:magnitude"].cells[0.9].n == 1
    assert [line.split(":")[0] for line in comparison.repeats] in ([str(tmp_path / "mag-b")], [str(tmp_path / "mag-a")])



def test_a_table_or_plot_file_that_cannot_be_written_is_one_line(cli, runs, monkeypatch):
    """compare --output on a full disk ended in an OSError chained into a WriteError traceback."""
    import errno

    from patcli import records

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(records, "open", no_space, raising=False)
    code, out, err = cli("compare", str(runs), "--output", str(runs / "table.txt"))
    assert code == 1 and "Traceback" not in err + out
    assert err.strip().splitlines()[-1] == f"error: cannot write {runs}/table.txt: No space left on device"
    monkeypatch.undo()

    def no_space_for_images(comparison, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "plot", no_space_for_images)
    code, out, err = cli("compare", str(runs), "--plot", str(runs / "curves.png"))
    assert code == 1 and err.strip().splitlines()[-1] == f"error: --plot: cannot write {runs}/curves.png: No space left on device"
