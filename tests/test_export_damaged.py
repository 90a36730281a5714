"""`patcli export` of a run whose weights or config snapshot are damaged: one line naming the file, exit 2, nothing written."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from patcli.cli import app


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny unstructured run, trained once for the module; each test damages its own copy."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = CliRunner().invoke(app, ["train", "model.hidden=[32,32]", "trainer.epochs=1", "pruning.sparsity=0.9",
                                          f"hydra.run.dir={root}/run"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return root / "run"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, why", [
    (lambda run: truncate(run / "model.safetensors"),
     "model.safetensors does not load into this model (Error while deserializing header: incomplete metadata, file not "
     "fully covered); allowed: the model.safetensors a finished patcli run wrote"),
    (lambda run: (run / "model.safetensors").write_bytes(b"not a safetensors file"),
     "model.safetensors does not load into this model"),
    (lambda run: (run / ".hydra" / "config.yaml").write_text("model:\n  hidden: [32, 32\n"),
     ".hydra/config.yaml is damaged or not a patcli config snapshot (expected ',' or ']', but got '<stream end>' at line 3)"),
    (lambda run: (run / ".hydra" / "config.yaml").write_text("- model\n- dataset\n"),
     ".hydra/config.yaml is damaged or not a patcli config snapshot (AttributeError: 'list' object has no attribute 'items')"),
    (lambda run: (run / ".hydra" / "config.yaml").write_text("model: ${nowhere}\n"),
     ".hydra/config.yaml is damaged or not a patcli config snapshot (InterpolationKeyError: Interpolation key 'nowhere' not found"),
], ids=["truncated-model", "garbage-model", "broken-yaml", "yaml-list", "bad-interpolation"])
def test_a_damaged_run_is_one_line_exit_2_and_leaves_no_export(cli, tmp_path, finished_run, damage, why):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    record = (run / "result.json").read_bytes()
    code, out, err = cli("export", str(run))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: RUN_DIR: {run}/") and why in err, err
    assert not (run / "export").exists() and (run / "result.json").read_bytes() == record


def test_the_undamaged_copy_exports(cli, tmp_path, finished_run):
    """The damage above is what fails: the same run, intact, exports."""
    shutil.copytree(finished_run, tmp_path / "run")
    code, out, err = cli("export", str(tmp_path / "run"))
    assert code == 0, err
    assert out.splitlines()[-1] == f"export dir: {tmp_path / 'run' / 'export'}"
    assert (tmp_path / "run" / "export" / "compressed.safetensors").is_file()


def test_an_export_link_into_the_run_folder_is_refused_before_it_replaces_the_runs_weights(cli, tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "export").symlink_to(run)
    weights = (run / "model.safetensors").read_bytes()
    code, _, err = cli("export", str(run))
    assert code == 2 and err.strip() == (f"error: RUN_DIR: {run}/export links to {run}, which holds a run; allowed: a link "
                                         "to a folder of the export's own")
    assert (run / "model.safetensors").read_bytes() == weights


def test_load_pruned_of_a_run_that_did_not_finish_says_so(tmp_path, finished_run):
    import patcli

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    record = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**record, "status": "interrupted"}))
    with pytest.raises(FileNotFoundError, match=r"holds no export \(model.json\): its run did not finish \(status "
                                                r"interrupted\), so there is nothing to export$"):
        patcli.load_pruned(run)


def test_load_pruned_imports_no_standard_library_module_a_tampered_export_names(cli, tmp_path, finished_run):
    """Importing some acts (antigravity opens a browser): a model never lives there."""
    import sys

    import patcli
    from patcli.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert cli("export", str(run))[0] == 0
    description = json.loads((run / "export" / "model.json").read_text())
    description["model"]["_target_"] = "this.Nope"
    (run / "export" / "model.json").write_text(json.dumps(description))
    sys.modules.pop("this", None)
    with pytest.raises(ConfigError, match=r"^model._target_: this is a standard-library module, not imported for a model"):
        patcli.load_pruned(run)
    assert "this" not in sys.modules


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    """The finished run exported (unstructured: compressed weights) and a structured one (a shrunk model)."""
    root = tmp_path_factory.mktemp("exported")
    runs = {"unstructured": root / "unstructured", "neurons": root / "neurons"}
    shutil.copytree(finished_run, runs["unstructured"])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = CliRunner().invoke(app, ["train", "model.hidden=[32,32]", "trainer.epochs=1", "pruning=neurons",
                                          "pruning.sparsity=0.5", f"hydra.run.dir={runs['neurons']}"], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        for run in runs.values():
            result = CliRunner().invoke(app, ["export", str(run), "--no-latency"], catch_exceptions=False)
            assert result.exit_code == 0, result.stderr
    return runs


def rewrite_description(change):
    def damage(export):
        description = json.loads((export / "model.json").read_text())
        (export / "model.json").write_text(json.dumps(change(description)))
    return damage


def rewrite_compressed_shapes(export, shapes):
    """The compressed weights with other shapes in their metadata (before, a shape asking for 364 TiB was allocated)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(export / "compressed.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(path), path, metadata={**metadata, "shapes": json.dumps(shapes)})


def drop(key):
    return rewrite_description(lambda d: {k: v for k, v in d.items() if k != key})


@pytest.mark.parametrize("kind, damage, error, why", [
    ("neurons", lambda e: (e / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors is missing from the export"),
    ("unstructured", lambda e: (e / "compressed.safetensors").unlink(), FileNotFoundError,
     "compressed.safetensors is missing from the export"),
    ("neurons", drop("shapes"), FileNotFoundError, "compressed.safetensors is missing"),  # read as unstructured
    ("unstructured", drop("meta"), ValueError, "model.json is damaged or not a patcli export (KeyError: 'meta')"),
    ("unstructured", rewrite_description(lambda d: []), ValueError, "model.json is damaged or not a patcli export (TypeError"),
    ("unstructured", lambda e: (e / "model.json").write_text("{"), ValueError, "model.json is damaged or not a patcli export"),
    ("unstructured", lambda e: (e / "compressed.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
     ValueError, "compressed.safetensors does not load into the model model.json describes"),
    ("unstructured", rewrite_description(lambda d: {**d, "meta": {}}), ValueError,
     "model.json is damaged or not a patcli export: its model cannot be built (KeyError"),
    ("neurons", rewrite_description(lambda d: {**d, "shapes": {"1.weight": [10**7, 10**7]}}), ValueError,
     "shapes.1.weight: [10000000, 10000000] is no shrunk shape of its (32, 64) weight"),
    ("neurons", rewrite_description(lambda d: {**d, "shapes": [1, 2]}), ValueError,
     "shapes: expected a mapping of names to shapes, got [1, 2]"),
    ("unstructured", lambda e: rewrite_compressed_shapes(e, {"1.weight": [10**7, 10**7]}), ValueError,
     "shapes.1.weight: [10000000, 10000000] holds 100000000000000 values, its mask only"),
    ("unstructured", lambda e: rewrite_compressed_shapes(e, [1, 2]), ValueError,
     "shapes: expected a mapping of names to shapes, got [1, 2]"),
], ids=["shrunk-model-missing", "compressed-missing", "shapes-missing", "meta-missing", "not-a-dict", "broken-json",
        "no-metadata", "meta-empty", "shrunk-shape-huge", "shrunk-shapes-a-list", "compressed-shape-huge",
        "compressed-shapes-a-list"])
def test_load_pruned_of_a_damaged_export_names_the_file(tmp_path, exported, kind, damage, error, why):
    import patcli

    run = tmp_path / kind
    shutil.copytree(exported[kind], run)
    damage(run / "export")
    with pytest.raises(error, match=re.escape(why)):
        patcli.load_pruned(run)
