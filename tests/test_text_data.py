"""A user's text file as a dataset: the data a run used is what keys its dense run and its cache."""

import hashlib
import os
import re
import shutil
import tracemalloc

import pytest
import torch

from patcli.config import ConfigError, NamedConfig
from patcli.data import load_dataset
from patcli.data.base import _cached_load
from patcli.data.text import TextFile

from conftest import result_of, run_dir_of

GPT = ["model=gpt", "model.d_model=16", "model.n_head=2", "dataset=text", "dataset.block_size=16", "trainer.max_steps=5"]
LOOP = "for i in range(10):\n    print(i * i)\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCLI_CACHE", str(tmp_path / "cache"))
    _cached_load.cache_clear()
    return tmp_path / "cache"


def text_config(path, **params):
    return NamedConfig("text", {"path": str(path), "block_size": 16, **params})


def run_config(*overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from patcli.config import parse_run_config
    from patcli.hydra_app import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", list(overrides))
    return parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))


def test_an_edited_text_file_changes_the_dense_key_and_an_unchanged_one_keeps_it(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(LOOP * 100)
    overrides = ["dataset=text", f"dataset.path={path}", "model=gpt", "baseline=magnitude", "pruning.sparsity=0.5"]
    before = run_config(*overrides)
    key = before.dense_key()
    assert run_config(*overrides).dense_key() == key
    path.write_text((LOOP * 101)[::-1])  # the same characters, another text
    after = run_config(*overrides)
    assert after.model_dataset_hash() != before.model_dataset_hash() and after.dense_key() != key
    assert before.dense_key() == key  # a config keeps the data it loaded, whatever the file does later


def test_prune_post_trains_a_new_dense_run_when_the_text_file_changes(cli, tmp_path):
    (tmp_path / "t.txt").write_text(LOOP * 100)
    args = ["prune-post", *GPT, "dataset.path=t.txt", "pruning.sparsity=0.5", "baseline=magnitude", "output_root=o"]
    code, _, err = cli(*args)
    assert code == 0, err
    (tmp_path / "t.txt").write_text((LOOP * 100)[::-1])  # same characters: the old dense run was reused
    code, _, err = cli(*args)
    assert code == 0, err
    (tmp_path / "t.txt").write_text(LOOP * 100 + "Z")  # a new character: the old dense run failed to load, forever
    code, _, err = cli(*args)
    assert code == 0, err
    dense = [p for p in (tmp_path / "o" / "dense").iterdir() if p.is_dir()]
    assert len(dense) == 3 and len({result_of(p)["model_dataset_hash"] for p in dense}) == 3


def test_a_cut_vocabulary_warns_in_every_run_log_with_the_fraction_and_the_key_to_raise(cli, tmp_path):
    path = tmp_path / "wide.txt"
    path.write_text("".join(chr(0x4E00 + i) for i in range(1000)) * 3)
    (warning,) = load_dataset(text_config(path, max_vocab=128)).warnings
    assert warning.startswith("87.3% of the characters map to the unknown id") and "dataset.max_vocab=128" in warning
    # the load above is cached, and the command checks its config before its job's log exists: each run still says it
    for command, run in (("train", "first"), ("train", "second"), ("prune-post", "post")):  # post trains its dense run too
        code, _, err = cli(command, *GPT, f"dataset.path={path}", "dataset.max_vocab=128", f"hydra.run.dir={run}",
                           *(["baseline=magnitude", f"output_root={tmp_path}/o"] if command == "prune-post" else []))
        assert code == 0, err
        assert (tmp_path / run / "run.log").read_text().count("87.3% of the characters map to the unknown id") == 1
    path.write_text(LOOP * 100)
    assert load_dataset(text_config(path)).warnings == []


def test_a_text_too_short_for_a_training_split_names_the_dataset_keys(cli, tmp_path):
    (tmp_path / "t.txt").write_text(("abcdefghij" * 4))
    code, out, err = cli("train", *GPT, "dataset.path=t.txt", "dataset.block_size=8", "dataset.val_fraction=0.45",
                         "dataset.test_fraction=0.45", "hydra.run.dir=run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.match(r"error: dataset: the training split has \d of the text's 40 characters \(0 windows of dataset.block_size="
                    r"8; dataset.val_fraction=0.45, dataset.test_fraction=0.45\); allowed: at least 16 characters", err), err
    assert "lower dataset.val_fraction or dataset.test_fraction" in err and "warmup" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="the validation split has 1 of the text's 40 characters"):
        load_dataset(NamedConfig("text", {"path": str(tmp_path / "t.txt"), "block_size": 8, "val_fraction": 0.025}))


def test_an_unusable_cache_folder_only_costs_the_cache_and_every_run_log_says_so(cli, tmp_path, monkeypatch):
    """The warning went to the terminal once, during the checks before any run log existed: run.log lacked it."""
    path = tmp_path / "t.txt"
    path.write_text(LOOP * 100)
    monkeypatch.setenv("PATCLI_CACHE", str(path / "sub"))  # under a file
    data = load_dataset(text_config(path))
    _cached_load.cache_clear()
    again = load_dataset(text_config(path))
    assert torch.equal(data.train.inputs, again.train.inputs)
    assert len(data.warnings) == 1 and data.warnings == again.warnings  # each load encodes again, and says why
    assert data.warnings[0].startswith(f"the dataset is not cached: {path / 'sub'} is not a usable folder")
    assert "set PATCLI_CACHE to a writable folder" in data.warnings[0]
    code, out, _ = cli("train", *GPT, f"dataset.path={path}", "trainer.max_steps=2")
    assert code == 0 and (run_dir_of(out) / "run.log").read_text().count("the dataset is not cached") == 1
    monkeypatch.setenv("PATCLI_CACHE", "")  # empty is unset: the default folder, not the current one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    _cached_load.cache_clear()
    load_dataset(text_config(path))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".pt"] == []
    assert len(list((tmp_path / "xdg" / "patcli").iterdir())) == 1


def test_only_the_characters_max_chars_keeps_are_read(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(LOOP * 1_000_000)  # 37 MB
    tracemalloc.start()
    try:
        text = TextFile(path=str(path), max_chars=200_000).text()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert text == (LOOP * 10_000)[:200_000] and peak < 4_000_000


def test_the_cache_follows_the_content_not_the_size_and_time(tmp_path):
    path, other = tmp_path / "t.txt", tmp_path / "other.txt"
    path.write_text(LOOP * 100)
    first = load_dataset(text_config(path))
    other.write_text((LOOP * 100)[::-1])  # same size, same characters
    stat = path.stat()
    shutil.copyfile(other, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p leaves it
    _cached_load.cache_clear()
    second = load_dataset(text_config(path))
    assert not torch.equal(first.train.inputs, second.train.inputs) and first.fingerprint != second.fingerprint
    assert second.fingerprint == hashlib.sha256(other.read_bytes()).hexdigest()


def test_an_edited_file_is_reloaded_within_one_process(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(LOOP * 100)
    first = load_dataset(text_config(path))
    path.write_text(LOOP.replace("i", "j") * 120)
    second = load_dataset(text_config(path))
    assert len(second.train) > len(first.train) and second.fingerprint != first.fingerprint


@pytest.mark.parametrize("head_dim", [0, -4])
def test_a_head_dim_below_one_is_refused_not_trained_as_the_default(cli, tmp_path, head_dim):
    (tmp_path / "t.txt").write_text(LOOP * 100)
    code, _, err = cli("train", *GPT, "dataset.path=t.txt", f"model.head_dim={head_dim}", "hydra.run.dir=run")
    assert code == 2 and err.strip() == f"error: model.head_dim: {head_dim} is out of range; allowed: >= 1, or null for d_model / n_head"
    assert not (tmp_path / "run").exists()


def test_export_after_the_text_file_was_edited_says_so(cli, tmp_path):
    (tmp_path / "t.txt").write_text(LOOP * 100)
    code, _, err = cli("train", *GPT, "dataset.path=t.txt", "hydra.run.dir=run")
    assert code == 0, err
    with open(tmp_path / "t.txt", "a") as handle:
        handle.write("Z@")  # two new characters: the rebuilt model would have another vocabulary
    code, _, err = cli("export", "run")
    assert code == 2 and "model and data no longer match its record" in err and "text file (dataset.path)" in err, err
    assert not (tmp_path / "run" / "export").exists()


def test_only_the_characters_read_must_be_utf8(tmp_path):
    good = LOOP * 100
    (tmp_path / "late.txt").write_bytes(good.encode() + b"\xff" + b"x" * 20_000)  # past max_chars, within the read-ahead
    assert TextFile(path=str(tmp_path / "late.txt"), max_chars=1000).text() == good[:1000]
    (tmp_path / "early.txt").write_bytes(b"ab\xffcd")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(a byte that is not UTF-8 at character 2\); allowed: a UTF-8 text file"):
        TextFile(path=str(tmp_path / "early.txt")).text()


def test_a_gpt_dropout_out_of_range_is_one_line_as_the_mlps_is(cli, tmp_path):
    """1.5 was a torch traceback at model build (exit 1); 1.0 trained a model that drops everything."""
    for value in ("1.5", "1.0"):
        code, _, err = cli("train", *GPT, "dataset=pysrc", f"model.dropout={value}", "hydra.run.dir=run")
        assert code == 2 and err.strip() == f"error: model.dropout: {value} is out of range; allowed: 0 <= value < 1", err
    assert not (tmp_path / "run").exists()
