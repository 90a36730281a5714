"""A user's text file as a dataset: the data a run used is what keys its dense run and its cache."""

import hashlib
import logging
import os
import shutil
import tracemalloc

import pytest
import torch

from patcli.config import NamedConfig
from patcli.data import load_dataset
from patcli.data.base import _cached_load
from patcli.data.text import TextFile

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


def test_an_unusable_cache_folder_only_costs_the_cache(tmp_path, monkeypatch, caplog):
    path = tmp_path / "t.txt"
    path.write_text(LOOP * 100)
    monkeypatch.setenv("PATCLI_CACHE", str(path / "sub"))  # under a file
    with caplog.at_level(logging.WARNING):
        data = load_dataset(text_config(path))
        _cached_load.cache_clear()
        again = load_dataset(text_config(path))
    assert torch.equal(data.train.inputs, again.train.inputs)
    assert caplog.text.count("is not cached") == 1 and "PATCLI_CACHE" in caplog.text
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
