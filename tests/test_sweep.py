"""`patcli sweep`: real Hydra multiruns with the basic and joblib launchers and the Optuna sweeper, failed jobs kept
apart, the summary table, and one-line errors for missing plugins and a wrong study direction."""

import json
import multiprocessing
import re
import sqlite3
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import joblib
import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from patcli.hydra_app import conf_dir
from patcli.plugins import JOBLIB_LAUNCHER, is_sqlite_database, job_threads

from conftest import TINY, result_of

FAST = [*TINY, "trainer.max_steps=20", "schedule.end=10", "pruning.frequency=5"]
# FAST with a model of the user's own, whose job fails at run time when +model.explode=true
EXPLODING = [*(o for o in FAST if not o.startswith("model.")), "model=custom", "model._target_=exploding_model.Exploding"]


def sweep_dir_of(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("sweep dir: "), last
    return Path(last.removeprefix("sweep dir: "))


def line_with(stdout: str, text: str) -> str:
    return next(line for line in stdout.splitlines() if text in line)


def table_row(stdout: str, label: str) -> list[str]:
    """The cells of the table row whose first column is ``label`` (split on runs of 2+ spaces)."""
    return next(re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip().startswith(f"{label}  "))


def percent(record: dict, split: str = "test") -> str:
    return f"{record['metrics'][split]['accuracy'] * 100:.1f}"


def test_basic_sweep_runs_every_combination_and_prints_its_table(cli, tmp_path):
    code, out, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.8", "scorer=magnitude,movement")
    assert code == 0, err
    sweep_dir = sweep_dir_of(out)
    assert re.fullmatch(r"outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-[0-9a-f]{6}", str(sweep_dir.relative_to(tmp_path)))
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    records = {(r["scorer"], r["target_sparsity"]): r for r in map(result_of, jobs)}
    assert set(records) == {(s, t) for s in ("magnitude", "movement") for t in (0.5, 0.8)}
    for job in jobs:
        assert (job / ".hydra" / "config.yaml").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        assert result_of(job)["status"] == "ok"
    assert "test accuracy" in out and "50%" in out and "80%" in out
    first = records[("magnitude", 0.5)]  # each job's line shows the validation value a sweeper optimises, then test
    (line,) = [line for line in out.splitlines() if "magnitude" in line and "s=0.5 seed=0" in line]
    assert f"val accuracy {first['metrics']['val']['accuracy']:.4f}, test {first['metrics']['test']['accuracy']:.4f}" in line
    for scorer in ("magnitude", "movement"):
        row = table_row(out, f"PAT agp+{scorer}+global")
        assert row == [f"PAT agp+{scorer}+global", "20", "1", percent(records[(scorer, 0.5)]), percent(records[(scorer, 0.8)])]


@pytest.mark.parametrize("n_jobs", ["0", "-999"])
def test_a_joblib_n_jobs_that_launches_nothing_is_a_one_line_error_before_the_sweep(cli, tmp_path, n_jobs):
    code, _, err = cli("sweep", *FAST, "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", "seed=0,1",
                       "hydra.sweep.dir=sweep")
    assert code == 2 and err.startswith("error: hydra.launcher.n_jobs: ") and "allowed: jobs at a time >= 1" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("limit, expected", [("hydra.launcher.timeout=0", "hydra.launcher.timeout: 0.0 is out of range; "
                                              "allowed: seconds > 0, or null (no limit)"),
                                             ("hydra.launcher.timeout=-1", "hydra.launcher.timeout: -1.0 is out of range"),
                                             # it ran loky, while multirun.yaml recorded threading
                                             ("hydra.launcher.backend=threading", "hydra.launcher.backend: 'threading' is "
                                              "not used: Hydra's joblib launcher always runs its jobs in loky processes")])
def test_a_launcher_setting_that_cannot_work_is_a_one_line_error_before_the_sweep(cli, tmp_path, limit, expected):
    """A time limit of 0 stopped every job at once, in a TimeoutError traceback, leaving a folder without records."""
    code, _, err = cli("sweep", *FAST, "hydra/launcher=joblib", limit, "seed=0,1", "hydra.sweep.dir=sweep")
    assert code == 2 and err.startswith(f"error: {expected}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "sweep").exists()


def test_joblib_sweep_runs_side_by_side_with_cores_split_between_jobs(cli, tmp_path):
    code, out, err = cli("sweep", *FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
                         f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 0, err
    assert sweep_dir_of(out) == tmp_path / "sweep"
    records = [result_of(tmp_path / "sweep" / n) for n in ("0", "1")]
    assert [r["seed"] for r in records] == [0, 1] and all(r["status"] == "ok" for r in records)
    assert {r["config"]["trainer"]["threads"] for r in records} == {max(1, joblib.cpu_count() // 2)}
    mean = sum(r["metrics"]["test"]["accuracy"] for r in records) / 2
    label, steps, seeds, cell = table_row(out, "PAT agp+magnitude+global")
    assert seeds == "2" and cell.startswith(f"{mean * 100:.1f}±")  # the two seeds pooled into one cell


def test_threads_per_job_split_the_cores_only_under_joblib():
    cores = joblib.cpu_count()
    assert job_threads(OmegaConf.create({"_target_": JOBLIB_LAUNCHER, "n_jobs": -1})) == 1
    assert job_threads(OmegaConf.create({"_target_": JOBLIB_LAUNCHER, "n_jobs": 1})) == cores
    assert job_threads(OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})) is None


def test_pat_vs_post_under_joblib_trains_the_dense_run_first_and_baselines_find_it(cli, tmp_path):
    preset = ["+experiment=pat_vs_post", "hydra.sweeper.params={baseline:'none,magnitude',pruning.sparsity:'0.8',seed:'0'}"]
    code, out, err = cli("sweep", *TINY, *preset, "hydra/launcher=joblib", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 0, err
    (dense,) = [p for p in (tmp_path / "outputs" / "dense").iterdir() if p.is_dir()]  # trained once, before the launch
    records = {r["method"]: r for r in (result_of(tmp_path / "sweep" / n) for n in ("0", "1"))}
    assert set(records) == {"pat", "post:magnitude"} and all(r["status"] == "ok" for r in records.values())
    assert records["post:magnitude"]["dense_reference"]["run_dir"] == str(dense.resolve())
    assert table_row(out, "dense")[-1] == percent(result_of(dense))
    delta = (records["post:magnitude"]["metrics"]["test"]["accuracy"] - result_of(dense)["metrics"]["test"]["accuracy"]) * 100
    assert table_row(out, "post:magnitude")[-1] == f"{percent(records['post:magnitude'])} ({delta:+.1f})"


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failing_job_does_not_stop_the_others(cli, tmp_path, launcher):
    code, out, err = cli("sweep", *EXPLODING, "+model.explode=false,true", f"hydra/launcher={launcher}",
                         f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 1 and err.strip() == "error: 1 of 2 jobs failed (listed apart in the table above)", err
    assert out.strip().splitlines()[-1] == f"sweep dir: {tmp_path}/sweep"
    ok, failed = result_of(tmp_path / "sweep" / "0"), result_of(tmp_path / "sweep" / "1")
    assert ok["status"] == "ok" and ok["model"] == "Exploding"
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: exploded on purpose"
    assert table_row(out, "PAT agp+magnitude+global")[-1] == percent(ok)
    assert "runs that did not finish ok" in out and "RuntimeError: exploded on purpose" in line_with(out, "failed")


def test_a_grid_study_resumed_from_storage_whose_last_trial_fails_names_the_best_of_every_session(cli, tmp_path, monkeypatch):
    import optuna.samplers._grid as grid

    monkeypatch.setattr(grid, "random", SimpleNamespace(choice=min))  # explode=False first, then explode=True
    study = [*EXPLODING, "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.direction=maximize",
             "hydra.sweeper.n_trials=1", "+model.explode=choice(false,true)", f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db",
             "hydra.sweeper.study_name=s"]
    code, first, err = cli("sweep", *study, f"hydra.sweep.dir={tmp_path}/one")
    assert code == 0, err
    value = result_of(tmp_path / "one" / "0")["metrics"]["val"]["accuracy"]
    code, second, err = cli("sweep", *study, f"hydra.sweep.dir={tmp_path}/two")
    assert code == 0 and result_of(tmp_path / "two" / "0")["status"] == "failed", err
    assert line_with(second, "best trial:") == (f"best trial: val accuracy {value:.4f} with +model.explode=False; a trial of an "
                                                "earlier session of this study (its run is in that session's sweep folder)")


def test_a_grid_study_in_memory_whose_last_trial_fails_finds_its_best_in_the_records(cli, tmp_path, monkeypatch):
    import optuna.samplers._grid as grid

    monkeypatch.setattr(grid, "random", SimpleNamespace(choice=min))  # explode=False first, then explode=True
    code, out, err = cli("sweep", *EXPLODING, "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid", "hydra.sweeper.direction=maximize",
                         "hydra.sweeper.n_trials=2", "+model.explode=choice(false,true)", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 0, err
    ok = result_of(tmp_path / "sweep" / "0")
    assert line_with(out, "best trial:") == (
        f"best trial: val accuracy {ok['metrics']['val']['accuracy']:.4f} with +model.explode=False; its test accuracy "
        f"{ok['metrics']['test']['accuracy']:.4f} → {tmp_path / 'sweep' / '0'} (found in the trials' records: the sweeper "
        "stopped before saving the study's best trial)")


def test_a_resumed_seed_stays_within_optunas_32_bits(tmp_path):
    from patcli.plugins import resumed_study_seed

    storage = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=storage).optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    sweeper = OmegaConf.create({"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "storage": storage,
                                "study_name": "s", "sampler": {"seed": 2**32 - 1}})
    assert resumed_study_seed(sweeper) == (2, 1)


@pytest.mark.parametrize("subdir", ["null", "meta"])
def test_a_studys_best_trial_is_found_wherever_hydra_keeps_the_jobs_own_config(cli, tmp_path, subdir):
    code, out, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=1",
                         "pruning.sparsity=interval(0.3,0.9)", f"hydra.output_subdir={subdir}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 0, err
    record = result_of(tmp_path / "sweep" / "0")
    assert line_with(out, "best trial:").endswith(f"; its test accuracy {record['metrics']['test']['accuracy']:.4f} → "
                                                  f"{tmp_path / 'sweep' / '0'}")  # it said "a trial of an earlier session"


def test_a_study_whose_trials_would_share_one_folder_is_refused_before_it_starts(cli, tmp_path):
    code, _, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=2",
                       "pruning.sparsity=interval(0.3,0.9)", "hydra.sweep.subdir=x", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2 and err.strip() == ("error: hydra.sweep.subdir: 'x' is the same folder (x) for every trial, so each "
                                         "would overwrite the one before; allowed: a name with the trial's number, e.g. "
                                         "${hydra.job.num} (the default)"), err
    assert list(tmp_path.iterdir()) == []
    code, _, err = cli("sweep", "--cfg", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                       "pruning.sparsity=interval(0.3,0.9)", "hydra.sweep.subdir=t_${seed}")  # a key no trial changes
    assert code == 2 and err.startswith("error: hydra.sweep.subdir: 't_${seed}' is the same folder (t_0)"), err
    for named in ("sp_${pruning.sparsity}", "${hydra.job.override_dirname}"):  # each trial's own values name its folder
        code, _, err = cli("sweep", "--cfg", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                           "pruning.sparsity=interval(0.3,0.9)", f"hydra.sweep.subdir={named}")
        assert code == 0, err


@pytest.mark.parametrize("query", ["", "?timeout=30"])
def test_a_storage_url_with_a_query_names_the_same_database_file(tmp_path, query):
    from patcli.config import ConfigError
    from patcli.plugins import check_storage, resumed_study_seed

    storage = f"sqlite:///{tmp_path}/s.db{query}"
    optuna.create_study(study_name="s", storage=storage).optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    sweeper = OmegaConf.create({"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "storage": storage,
                                "study_name": "s", "sampler": {"seed": 7}})
    assert resumed_study_seed(sweeper) == (2, 9)
    (tmp_path / "s.db").write_text("not a database")
    with pytest.raises(ConfigError, match=f"{tmp_path}/s.db is not an SQLite database"):
        check_storage(sweeper)


@pytest.mark.parametrize("failing", ["first", "last"])
def test_optuna_study_optimises_val_tells_failed_trials_and_prints_the_best(cli, tmp_path, monkeypatch, failing):
    """The grid sampler draws its points at random; told of a failed last trial, it stops the study where Optuna
    refuses it and the sweeper saved no best trial (a traceback, half the time): both orders, drawn on purpose."""
    import optuna.samplers._grid as grid

    order = SimpleNamespace(choice=lambda ids: (max if failing == "first" else min)(ids))  # grid 0: explode=False
    monkeypatch.setattr(grid, "random", order)
    storage = f"sqlite:///{tmp_path}/study.db"  # a database storage: optuna 2 needs SQLAlchemy 1.x for it
    code, out, err = cli("sweep", *EXPLODING, "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                         "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=2", "+model.explode=choice(false,true)",
                         f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=s", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 0, err
    study = optuna.load_study(study_name="s", storage=storage)
    states = {t.params["+model.explode"]: t.state for t in study.trials}
    assert states == {False: optuna.trial.TrialState.COMPLETE, True: optuna.trial.TrialState.FAIL}
    records = [result_of(tmp_path / "sweep" / n) for n in ("0", "1")]
    (ok,) = [r for r in records if r["status"] == "ok"]
    assert study.best_value == ok["metrics"]["val"]["accuracy"]  # validation, never test
    assert "val accuracy" in out and table_row(out, "PAT agp+magnitude+global")[-1] == percent(ok, "val")
    best = line_with(out, "best trial:")
    assert f"val accuracy {study.best_value:.4f} with +model.explode=False" in best
    assert f"its test accuracy {ok['metrics']['test']['accuracy']:.4f}" in best
    assert "found in the trials' records" not in best  # the study's storage tells its best
    done = line_with(out, "done ")  # a trial's own line shows what the study sees: its test value only comes once
    assert f"val accuracy {ok['metrics']['val']['accuracy']:.4f}" in done and ", test " not in done
    assert out.count("test accuracy") == 1


def test_a_seeded_study_resumed_from_storage_searches_on_instead_of_repeating_its_trials(cli, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    study_args = [*FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=2",
                  "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=3", f"hydra.sweeper.storage={storage}",
                  "hydra.sweeper.study_name=s", "pruning.sparsity=interval(0.3,0.9)"]
    code, first, err = cli("sweep", *study_args, f"hydra.sweep.dir={tmp_path}/one")
    assert code == 0 and "resuming" not in first, err
    code, second, err = cli("sweep", *study_args, f"hydra.sweep.dir={tmp_path}/two")
    assert code == 0, err
    assert "resuming study 's' after its 2 trials: its sampler draws with seed 5 instead of 3, so that it does not repeat them" in second
    drawn = [t.params["pruning.sparsity"] for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert len(drawn) == 4 and len(set(drawn)) == 4  # seeded as before, the second session drew the first one's again


def test_a_best_trial_from_an_earlier_session_of_the_study_says_where_it_ran(capsys, tmp_path):
    from patcli.cli import show_best_trial
    from patcli.records import RunRecord, write_record
    from patcli.sweeps import BestTrial

    write_record(tmp_path / "1", RunRecord(method="pat", recipe="agp", model="gpt", dataset="pysrc", model_dataset_hash="h",
                                           seed=0, primary_metric="loss", higher_is_better=False, metrics={"val": {"loss": 2.0}}))
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "result.json").write_text("{")  # a damaged one is passed over
    show_best_trial(BestTrial({"schedule.end": 0.5}, 1.9, None), [tmp_path])  # a study's sweep gives its folder
    assert capsys.readouterr().out.strip() == ("best trial: val loss 1.9000 with schedule.end=0.5; a trial of an earlier "
                                               "session of this study (its run is in that session's sweep folder)")


def test_optuna_study_with_no_finished_trial_says_so(cli, tmp_path):
    code, out, err = cli("sweep", *EXPLODING, "+model.explode=true", "hydra/sweeper=optuna",
                         "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=1", "schedule.end=interval(0.5,0.9)")
    assert code == 1
    assert "no trial finished ok" in err and "exploded on purpose" in out


def test_optuna_direction_must_fit_the_primary_metric(cli, tmp_path):
    code, out, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "schedule.end=interval(0.5,0.9)")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "hydra.sweeper.direction: minimize does not fit val accuracy (higher is better); allowed: maximize" in err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("searched, expected", [
    ("pruning.sparsity=interval(0.5,1.5)", "pruning.sparsity: 1.5 is out of range; allowed: 0.0 <= value < 1.0 (searched: pruning.sparsity=1.5)"),
    ("pruning.frequency=choice(10,a)", "pruning.frequency: expected an integer, got 'a' (searched: pruning.frequency=a)"),
    ("schedule.end=interval(5,10)", "schedule.end: 5.0 is out of range"),  # Optuna samples floats here: fractions
    # Optuna samples a range's stop too (its distributions' high), which Python's range() leaves out
    ("pruning.sparsity=range(0.5,1.0,0.25)", "pruning.sparsity: 1.0 is out of range; allowed: 0.0 <= value < 1.0 "
                                             "(searched: pruning.sparsity=1.0)"),
    # each of these was a traceback from inside the sweeper, after the sweep's folder was made
    ("pruning.sparsity=tag(log,interval(0.0,0.9))", "pruning.sparsity: Optuna cannot search tag(log,interval(0.0,0.9)) "
                                                    "(The `low` value must be larger than 0 for a log distribution"),
    ("hydra.sweeper.sampler._target_=nope.Sampler", "hydra.sweeper.sampler: Optuna's sampler cannot be made (Error locating "
                                                    "target 'nope.Sampler'"),
    ("hydra/sweeper/sampler=grid pruning.sparsity=interval(0.5,0.9)", "pruning.sparsity: interval() is sampled, and the "
                                                                     "grid sampler only goes through listed values"),
    ("hydra.sweeper.storage=bogus://x", "hydra.sweeper.storage: bogus://x cannot be opened here (Can't load plugin: "
                                        "sqlalchemy.dialects:bogus); allowed: sqlite:///FILE, or a database whose driver "
                                        "is installed"),
])
def test_an_optuna_search_space_no_trial_could_run_is_a_one_line_error_before_the_study(cli, tmp_path, searched, expected):
    code, _, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", *searched.split())
    assert code == 2 and err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_sweeps_that_would_fail_inside_a_plugin_are_one_line_errors_before_they_start(cli, tmp_path, monkeypatch):
    code, _, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                       f"hydra.sweeper.storage=sqlite:///{tmp_path}/no/such/folder/study.db", "hydra.sweeper.study_name=s")
    assert code == 2 and err.strip() == f"error: hydra.sweeper.storage: {tmp_path}/no/such/folder does not exist; allowed: " \
                                        "a file in an existing, writable directory"
    (tmp_path / "notes.db").write_text("not a database")  # every trial failed on it, then a traceback
    code, _, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                       f"hydra.sweeper.storage=sqlite:///{tmp_path}/notes.db", "hydra.sweeper.study_name=s")
    assert code == 2 and err.strip() == f"error: hydra.sweeper.storage: {tmp_path}/notes.db is not an SQLite database; allowed: " \
                                        "a study's database file, or a new file name"
    code, _, err = cli("sweep", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "trainer.device=cuda",
                       "pruning.sparsity=interval(0.5,0.9)")  # every trial failed on the device, one by one
    assert code == 2 and err.startswith("error: trainer.device:")
    (tmp_path / "notes.db").unlink()
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    code, _, err = cli("sweep", *FAST, "seed=0,1", "hydra/launcher=submitit_slurm")
    assert code == 2 and err.startswith("error: hydra/launcher: submitit_slurm submits to SLURM, and this machine has no srun")
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_storage_file_is_an_sqlite_database_only_when_empty_or_written_by_sqlite(tmp_path):
    (tmp_path / "empty.db").touch()  # SQLite makes an empty file a database
    (tmp_path / "one_byte.db").write_bytes(b"x")  # SQLite reads it as empty too, and writes a database over it
    with sqlite3.connect(tmp_path / "study.db") as connection:
        connection.execute("CREATE TABLE trials (id INTEGER)")
    verdicts = {path.name: is_sqlite_database(path) for path in sorted(tmp_path.iterdir())}
    assert verdicts == {"empty.db": True, "one_byte.db": False, "study.db": True}
    assert (tmp_path / "one_byte.db").read_bytes() == b"x"


@pytest.mark.parametrize("sweep, expected", [
    # "unknown key; allowed: baseline.rounds, baseline.finetune_fraction, baseline.lr"
    (["baseline=iterative,pat_from_dense", "baseline.finetune_fraction=0.5"], "baseline.finetune_fraction: the sweep's "
     "config is composed with baseline's default option before each job chooses its own, and the default has no such "
     "key; allowed: ++baseline.finetune_fraction=VALUE (each job's option must take it)"),
    # "pruning.sparsity: unknown key", without the job: as if no run had a sparsity
    (["pruning=unstructured,none", "pruning.sparsity=0.5,0.9"], "pruning.sparsity: pruning=none trains the dense reference, "
     "which has no sparsity to set; allowed: leave it out (a sweep over dense and pruned runs: +experiment=pat_vs_post, or "
     "the sparsities of the pruned runs swept apart) (sweep job: "),
    # an AttributeError traceback from OmegaConf's merge
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", 'hydra.sweeper.params={pruning.sparsity: "interval(0.1,0.9)"}'],
     "hydra.sweeper.params: the searched keys are given as overrides of their own on the command line; allowed: e.g. "
     "'pruning.sparsity=interval(0.5,0.9)'"),
    (["hydra/sweeper=optuna", "+hydra.sweeper.params.scorer=choice(magnitude)"], "hydra.sweeper.params.scorer: the "
     "searched keys are given as overrides of their own"),
    # "Sweeping over Hydra's configuration is not supported", and "unknown key; allowed: ..., hydra.sweeper.params"
    (["+experiment=tune_schedule", "hydra.sweeper.params.scorer=choice(magnitude)"], "hydra.sweeper.params.scorer: the "
     "searched keys are given as overrides of their own"),
    (["+experiment=tune_schedule", 'hydra.sweeper.params={pruning.sparsity: "interval(0.1,0.9)"}'], "hydra.sweeper.params: "
     "the searched keys are given as overrides of their own"),
    (["+experiment=pat_vs_post", "hydra.sweeper.params.seed='0'", "hydra.sweeper.params.pruning.sparsity='0.5'"],
     "hydra.sweeper.params.pruning.sparsity: the searched keys"),  # it named params.seed, which the preset's space has
    # a swept choice made the hint list the top-level keys under the typo's parent: "trainer.seed, trainer.model, ..."
    (["seed=0,1", "trainer.epoch=3"], "trainer.epoch: unknown key; allowed: trainer.epochs, trainer.max_steps"),
    (["scorer=magnitude,movement", "pruning.sparsty=0.9"], "pruning.sparsty: unknown key; allowed: pruning.sparsity, "
                                                           "pruning.frequency"),  # not pruning.mode, chosen with pruning=
    (["schedule=agp,cubic", "schedule.powr=2"], "schedule.powr: unknown key; allowed: schedule.begin, schedule.end"),
    (["pruning.sparsity=range(0,1,0)"], "pruning.sparsity: range(0, 1, 0) holds no value; allowed: range(start, stop, step)"),
    (["pruning.frequency=range(10,5)"], "pruning.frequency: range(10, 5, 1) holds no value"),
    (["pruning.sparsity=interval(0.5,0.9)"], "pruning.sparsity: interval() is sampled by a searching sweeper; allowed: hydra/sweeper=optuna"),
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "pruning.sparsity=interval(0.9,0.5)"],
     "pruning.sparsity: interval(0.9, 0.5) has its ends reversed; allowed: interval(low, high) with low <= high"),
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=0"],
     "hydra.sweeper.n_trials: 0 is out of range; allowed: an integer >= 1"),
    (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=abc"],
     "hydra.sweeper.n_trials: Value 'abc' of type 'str' could not be converted to Integer"),
    # inside the sweeper: a ZeroDivisionError, a bare AssertionError, numpy's seed error, SQLAlchemy's URL error
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.n_jobs=0"],
     "hydra.sweeper.n_jobs: 0 is out of range; allowed: an integer >= 1"),
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.max_failure_rate=2"],
     "hydra.sweeper.max_failure_rate: 2.0 is out of range; allowed: 0.0 <= value <= 1.0"),
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=-1"],
     "hydra.sweeper.sampler.seed: -1 is out of range; allowed: 0 <= seed < 2**32, or null"),
    (["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "pruning.sparsity=interval(0.5,0.9)",
      "hydra.sweeper.storage=study.db"],
     "hydra.sweeper.storage: 'study.db' is not a database URL; allowed: e.g. sqlite:///study.db"),
    # Hydra launched no job and left a sweep folder, and the error said no records were found
    (["scorer=glob(xyz*)"], "scorer=glob(xyz*): the sweep makes no job; allowed: values that name at least one option"),
    (["scorer=null"], "scorer=null: not an option name; allowed: one of activation, "),  # a traceback
    (["scorer=[magnitude,random]"], "scorer=[magnitude,random]: not an option name"),  # one job merging both
])
def test_sweep_functions_the_sweeper_would_fail_on_are_one_line_errors_naming_the_key(cli, tmp_path, sweep, expected):
    code, _, err = cli("sweep", *FAST, *sweep)
    assert code == 2 and err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_tune_schedule_preset_composes_an_optuna_search_on_the_validation_metric():
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", ["+experiment=tune_schedule"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert {"schedule.end", "pruning.frequency", "scorer"} <= set(sweeper.params) and cfg.pruning.sparsity == 0.95


SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_submitit_slurm_launcher_composes_for_clusters():
    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                 "hydra.launcher.cpus_per_task=4", "hydra.sweep.dir=/scratch/sweep"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM and (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("gpu", 30, 4)
    assert launcher.submitit_folder == "/scratch/sweep/.submitit/%j"


def test_a_cluster_launcher_config_of_ones_own_composes_with_a_preset(tmp_path):
    """The README's way: a launcher config in a folder on Hydra's search path, next to +experiment=pat_vs_post."""
    folder = tmp_path / "conf" / "hydra" / "launcher"
    folder.mkdir(parents=True)
    (folder / "my_cluster.yaml").write_text("defaults:\n  - submitit_slurm\n  - _self_\npartition: gpu\ncpus_per_task: 4\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path}/conf]", "hydra/launcher=my_cluster", "+experiment=pat_vs_post"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == SLURM and (cfg.hydra.launcher.partition, cfg.hydra.launcher.cpus_per_task) == ("gpu", 4)
    assert cfg.hydra.sweeper.params.baseline.startswith("none,")


def test_a_missing_plugin_names_the_extra_to_install(cli, tmp_path, monkeypatch):
    Plugins.instance()  # plugins register their configs when first scanned; then hide joblib as if not installed
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "joblib.yaml")
    code, out, err = cli("sweep", *FAST, "hydra/launcher=joblib", "seed=0,1")
    assert code == 2 and "Traceback" not in out + err
    assert err.strip() == "error: hydra/launcher=joblib needs a Hydra plugin that is not installed: pip install -c constraints.txt -e '.[sweep]' in the patcli checkout"
    code, _, err = cli("sweep", *FAST, "hydra/sweeper=nope")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "hydra/sweeper=nope: unknown option; allowed: basic, optuna" in err
    assert not (tmp_path / "outputs").exists()


def test_a_run_folder_and_a_sweep_folder_are_never_reused_for_each_other(cli, tmp_path):
    code, _, err = cli("train", *FAST, "hydra.run.dir=r1")
    assert code == 0, err
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=r1")
    assert code == 2 and "r1 already holds a run (" in err, err
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=s1")
    assert code == 0, err
    code, _, err = cli("train", *FAST, "hydra.run.dir=s1")
    assert code == 2 and "s1 already holds a sweep (" in err, err


def test_a_subdir_that_is_the_same_for_every_job_is_refused(cli, tmp_path):
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.subdir=same")
    assert code == 2 and err.strip().startswith("error: hydra.sweep.subdir: 'same' is the same folder (same) for the jobs "
                                                "'pruning.sparsity=0.5' and 'pruning.sparsity=0.9'"), err
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_dense_reference_fails_only_the_jobs_that_need_it(cli, tmp_path):
    code, out, err = cli("sweep", *FAST, "trainer.lr=0.01,1e30", "baseline=none,magnitude", "hydra.sweep.dir=s")
    assert code == 1, err
    records = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("*/result.json")]
    statuses = sorted((r["config"]["trainer"]["lr"], r["method"], r["status"]) for r in records)
    assert statuses == [(0.01, "pat", "ok"), (0.01, "post:magnitude", "ok"),
                        (1e30, "pat", "failed"), (1e30, "post:magnitude", "failed")]
    dense = sorted(json.loads(p.read_text())["status"] for p in (tmp_path / "outputs" / "dense").glob("*/result.json"))
    assert dense == ["failed", "ok"]  # the diverged dense folder says what happened
    failed = next(r for r in records if r["method"] == "post:magnitude" and r["status"] == "failed")
    assert "diverged with these settings" in failed["error"]  # the job did not train the same dense run again


def test_a_stopped_sweep_records_the_jobs_a_worker_left_unfinished(tmp_path):
    from omegaconf import OmegaConf

    from patcli.sweeps import record_unfinished

    for job, finished in (("0", True), ("1", False), ("p0.9/2", False)):  # a nested hydra.sweep.subdir too
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"seed": 3, "pruning": {"sparsity": 0.9}}))
        if finished:
            (tmp_path / job / "result.json").write_text("{}")
    record_unfinished(tmp_path)
    assert (tmp_path / "0" / "result.json").read_text() == "{}"
    for job in ("1", "p0.9/2"):
        record = json.loads((tmp_path / job / "result.json").read_text())
        assert record["status"] == "interrupted" and record["seed"] == 3 and record["target_sparsity"] == 0.9


def test_an_unfinished_jobs_record_resolves_its_snapshot(tmp_path):
    """Hydra saves a job's config with its interpolations (scorer.seed: ${seed}): read as text, the record lost
    its recipe and group (the string failed the config check)."""
    from patcli.sweeps import record_unfinished

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", ["scorer=random", "seed=3"])
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # as Hydra writes it: unresolved
    assert "${seed}" in (tmp_path / "0" / ".hydra" / "config.yaml").read_text()
    record_unfinished(tmp_path)
    record = json.loads((tmp_path / "0" / "result.json").read_text())
    assert record["recipe"] == "agp+random+global" and record["config"]["scorer"]["seed"] == 3
    assert record["model_dataset_hash"] == "9571b9344bc8"


def test_a_sweep_stops_before_any_job_when_the_dense_cache_cannot_be_made(cli, tmp_path):
    (tmp_path / "afile").write_text("")
    code, _, err = cli("sweep", *FAST, "baseline=magnitude", "pruning.sparsity=0.5,0.8", "output_root=afile", "hydra.sweep.dir=sw")
    assert code == 2 and err.strip().startswith(f"error: output_root: {tmp_path}/afile is a file, so ") and not (tmp_path / "sw").exists()


def test_a_subdir_that_resolves_alike_for_two_jobs_is_refused_before_any_runs(cli, tmp_path):
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.subdir=s${seed}", "hydra.sweep.dir=sw")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: hydra.sweep.subdir: 's${seed}' is the same folder (s0) for the jobs "
                          "'pruning.sparsity=0.5' and 'pruning.sparsity=0.9'"), err
    assert not (tmp_path / "sw").exists()
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.subdir=s${pruning.sparsity}", "hydra.sweep.dir=ok")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ok").iterdir() if p.is_dir()) == ["s0.5", "s0.9"]


def test_a_sweep_folder_holding_an_earlier_sweep_further_down_is_refused(cli, tmp_path):
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=multirun/2026-11-29/a")
    assert code == 0, err
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=multirun")
    assert code == 2 and "multirun already holds a sweep (2026-11-29/a/multirun.yaml)" in err, err
    # and the other way round: a run or sweep inside an earlier sweep would join its table
    before = sorted(p for p in tmp_path.rglob("*"))
    for command, override, key in ((["sweep", "pruning.sparsity=0.5,0.9"], "++hydra.sweep.dir=multirun/2026-11-29/a/more", "hydra.sweep.dir"),
                                   (["train"], "hydra.run.dir=multirun/2026-11-29/a/extra", "hydra.run.dir")):
        code, _, err = cli(*command, *FAST, override)
        assert code == 2 and err.strip() == (f"error: {key}: multirun/2026-11-29/a/{override.rsplit('/', 1)[1]} lies inside "
                                             f"the sweep {tmp_path}/multirun/2026-11-29/a (multirun.yaml); allowed: a "
                                             "directory outside it"), err
    assert sorted(p for p in tmp_path.rglob("*")) == before
    code, _, err = cli("train", *FAST, "hydra.run.dir=multirun/2026-11-29/a/../beside")  # beside the sweep, not in it
    assert code == 0, err
    (tmp_path / "into").symlink_to(tmp_path / "multirun" / "2026-11-29" / "a" / "0")
    code, _, err = cli("train", *FAST, "hydra.run.dir=into/../inside")  # through a link, .. is the sweep itself
    assert code == 2 and "lies inside the sweep" in err, err


def test_a_glob_over_a_groups_options_sweeps_them(cli, tmp_path):
    """glob() needs the config loader to list a group's options: the sweep crashed with 'ConfigLoader is not set'."""
    code, out, err = cli("sweep", *FAST, "scorer=glob(m*)", "hydra.sweep.dir=sw")
    assert code == 0, err
    assert sorted(result_of(p)["scorer"] for p in (tmp_path / "sw").iterdir() if (p / "result.json").exists()) == [
        "magnitude", "movement"]


def test_a_searched_key_fixed_on_the_command_line_is_not_checked_as_searched():
    """The study never tries a preset's scorer=movement once scorer=magnitude is given: its edges must not either."""
    from hydra import compose, initialize_config_dir

    from patcli.sweeps import search_space_edges

    overrides = ["+experiment=tune_schedule", "scorer=magnitude"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
        edges = search_space_edges(overrides, cfg)
    assert edges and not any(job[-1].startswith("scorer=") for job in edges)
    assert any(job[-1].startswith("schedule=") for job in edges)
    for searched, edge_values in (("range(0.5,1.0,0.25)", ["0.5", "1.0"]),  # Optuna samples the stop of a range
                                  ("shuffle(range(0.5,1.0,0.25))", ["0.5", "0.75"])):  # a shuffled one is a list to it
        overrides = [f"pruning.sparsity={searched}"]
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", ["hydra/sweeper=optuna"], return_hydra_config=True)
            edges = search_space_edges(overrides, cfg)
        assert sorted(job[-1].split("=", 1)[1] for job in edges) == edge_values


def test_a_subdir_through_hydras_own_resolver_is_resolved_per_job_as_hydra_does(cli, tmp_path):
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.subdir=j${hydra:job.num}", "hydra.sweep.dir=ok")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ok").iterdir() if p.is_dir()) == ["j0", "j1"]
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.subdir=${hydra:job.name}", "hydra.sweep.dir=no")
    assert code == 2 and "is the same folder (" in err, err


def test_a_subdir_only_the_job_can_resolve_is_left_to_the_job(tmp_path, monkeypatch):
    """An environment variable a cluster launcher sets on its node: no clash can be told before the jobs run."""
    from hydra import initialize_config_dir
    from hydra.types import RunMode

    from patcli.hydra_app import compose, conf_dir, job_subdir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NODE_JOB_ID", raising=False)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="patcli"):
        composed = compose(["hydra.sweep.subdir=${oc.env:NODE_JOB_ID}"], RunMode.RUN)
        assert job_subdir(composed, 0) is None
        monkeypatch.setenv("NODE_JOB_ID", "7")
        assert job_subdir(composed, 0) == "7"


def test_a_sweep_stopped_before_any_job_began_gives_its_folder_back(cli, tmp_path, monkeypatch):
    """Ctrl-C while joblib's workers started left .patcli-sweep and multirun.yaml, and a retry was refused as a sweep's."""
    from hydra._internal.hydra import Hydra

    def stops(self, config_name, task_function, overrides, *args, **kwargs):
        folder = Path(next(o for o in overrides if o.startswith("hydra.sweep.dir=")).split("=", 1)[1].strip("'"))
        (folder / "multirun.yaml").write_text("hydra:\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Hydra, "multirun", stops)
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=sw")
    assert code == 130 and not (tmp_path / "sw").exists(), err
    code, _, err = cli("sweep", "--cfg", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=sw")
    assert code == 0, err


def test_a_launcher_that_stops_before_any_job_is_recorded_says_why(cli, tmp_path, monkeypatch):
    """It said only "no run records (result.json) under ...", with exit code 2."""
    from hydra._internal.hydra import Hydra

    def stops(self, *args, **kwargs):
        raise multiprocessing.TimeoutError()

    monkeypatch.setattr(Hydra, "multirun", stops)
    code, out, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=sw")
    assert code == 1 and err.strip() == ("error: the sweep stopped: TimeoutError; the jobs it held are recorded as failed, "
                                         "those not started are missing"), err
    assert out.strip().splitlines()[-1] == f"sweep dir: {tmp_path}/sw"


class UncompletedJobError(RuntimeError):
    """submitit's, by name: its launcher is an extra the tests do not install."""


@pytest.mark.parametrize("search", [[], ["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "schedule.end=interval(0.5,0.9)"]],
                         ids=["basic", "optuna"])
@pytest.mark.parametrize("stop, said", [
    (BrokenProcessPool("A worker process managed by the executor was unexpectedly terminated."), "the launcher's worker died"),
    (multiprocessing.TimeoutError(), "the launcher's time limit ran out"),  # joblib's timeout, a traceback
    (UncompletedJobError("Job 7 (task: 0) with path x has not produced any output"), "the launcher's time limit ran out"),
], ids=["worker died", "joblib timeout", "submitit timeout"])
def test_a_launcher_that_stops_leaves_its_jobs_recorded_failed_a_table_and_exit_1(cli, tmp_path, monkeypatch, search, stop, said):
    """A joblib worker killed mid-sweep (out of memory, kill -9) ended in a TerminatedWorkerError traceback, no table,
    and no record for the jobs it held; a launcher's time limit, in its own traceback."""
    from hydra._internal.hydra import Hydra

    def stops(self, config_name, task_function, overrides, *args, **kwargs):
        folder = Path(next(o for o in overrides if o.startswith("hydra.sweep.dir=")).split("=", 1)[1].strip("'"))
        (folder / "0" / ".hydra").mkdir(parents=True)  # a job in flight when the launcher stopped
        (folder / "0" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"seed": 0, "pruning": {"sparsity": 0.5}}))
        raise stop

    monkeypatch.setattr(Hydra, "multirun", stops)
    code, out, err = cli("sweep", *FAST, *(search or ["pruning.sparsity=0.5,0.9"]), "hydra.sweep.dir=sw")
    assert code == 1 and "Traceback" not in err  # a study saved no best trial: it said "no trial finished ok"
    why = f"{type(stop).__name__}: {stop}" if str(stop) else type(stop).__name__
    assert err.strip().endswith(f"error: the sweep stopped: {why}; the jobs it held are recorded as failed, those not "
                                "started are missing")
    record = result_of(tmp_path / "sw" / "0")
    assert record["status"] == "failed" and record["error"] == f"RuntimeError: {said} ({why})"
    assert "runs that did not finish ok" in out


def test_a_cluster_sweep_whose_dense_runs_need_a_device_this_machine_lacks_says_where_they_train(cli, tmp_path):
    """A cluster launcher runs the jobs elsewhere, but the dense runs the baselines start from are trained here,
    before the jobs are submitted: a login node without CUDA stops at once, saying so and how to go on."""
    code, _, err = cli("sweep", *FAST, "baseline=magnitude", "seed=0,1", "hydra/launcher=submitit_local",
                       "trainer.device=cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: trainer.device: cuda was asked for but no CUDA device is available; allowed here: auto, "
                          "cpu; the dense runs the sweep's baselines start from are trained on this machine before the "
                          "jobs are submitted: train one where CUDA is and give it with dense=DIR"), err
    assert not (tmp_path / "outputs").exists()  # no failed dense record, no cache folder


def test_two_sweeps_started_together_into_one_folder_do_not_share_it(cli, tmp_path, monkeypatch):
    """Both passed the check made before the folder existed, wrote their jobs 0 and 1 over each other's, and each
    printed a table of the other's runs."""
    from patcli import hydra_app

    (tmp_path / "race").mkdir()
    (tmp_path / "race" / hydra_app.SWEEP_MARK).touch()  # the other sweep claimed it a moment ago
    monkeypatch.setattr(hydra_app, "holds_a_run", lambda directory: None)  # its check ran before that
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=race")
    assert code == 2 and err.strip() == (f"error: hydra.sweep.dir: {tmp_path}/race was taken by another sweep started at "
                                         "the same time; allowed: a directory no sweep uses"), err
    assert sorted(p.name for p in (tmp_path / "race").iterdir()) == [hydra_app.SWEEP_MARK]


def test_a_sweep_folder_is_known_as_one_before_its_sweeper_writes_anything_of_its_own(cli, tmp_path):
    """An Optuna study writes no multirun.yaml (its results file only at the end): runs and sweeps could be put
    inside one, and its table then counted them."""
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=s")
    assert code == 0, err
    (tmp_path / "s" / "multirun.yaml").unlink()  # as an Optuna study (or one stopped half way) leaves it
    code, _, err = cli("train", *FAST, "hydra.run.dir=s/extra")
    assert code == 2 and "lies inside the sweep" in err and "allowed: a directory outside it" in err, err
    code, _, err = cli("sweep", *FAST, "seed=0,1", "hydra.sweep.dir=s")
    assert code == 2 and "s already holds a sweep (" in err, err


@pytest.mark.parametrize("sweep_dir", ["o", "."])
def test_a_sweep_whose_folder_would_hold_the_shared_dense_runs_is_refused(cli, tmp_path, sweep_dir):
    """With output_root inside the sweep's folder, the dense runs later sweeps train joined this sweep's table."""
    code, _, err = cli("sweep", *FAST, "baseline=magnitude", "pruning.sparsity=0.5,0.9", "output_root=o",
                       f"hydra.sweep.dir={sweep_dir}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: output_root: the dense runs its baselines start from go to {tmp_path}/o/dense, inside "
                          f"the sweep's folder {tmp_path.joinpath(sweep_dir).resolve()}, where later sweeps' dense runs "
                          "would join this sweep's table; allowed: an output_root outside hydra.sweep.dir, or dense=DIR"), err
    assert not (tmp_path / "o").exists()


def test_a_sweep_that_fails_before_any_job_leaves_its_folder_free_for_a_retry(cli, tmp_path, monkeypatch):
    """An Optuna storage that cannot be opened failed the sweep before any trial, and the folder it had marked refused
    the retry as "already holds a sweep"."""
    from hydra._internal.hydra import Hydra

    def fails_to_start(self, *args, **kwargs):
        raise ImportError("Failed to import DB access module for the storage")

    with monkeypatch.context() as patched:
        patched.setattr(Hydra, "multirun", fails_to_start)
        with pytest.raises(ImportError):
            cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=s")
    assert not (tmp_path / "s").exists()
    (tmp_path / "given").mkdir()  # a folder the user made stays, empty
    with monkeypatch.context() as patched:
        patched.setattr(Hydra, "multirun", fails_to_start)
        with pytest.raises(ImportError):
            cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=given")
    assert list((tmp_path / "given").iterdir()) == []
    code, _, err = cli("sweep", *FAST, "pruning.sparsity=0.5,0.9", "hydra.sweep.dir=s")
    assert code == 0, err
