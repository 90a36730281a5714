"""A user's text file as a dataset: the data a run used is what keys its dense run and its cache."""

import logging

import pytest
import torch

from patcli.config import NamedConfig
from patcli.data import load_dataset
from patcli.data.base import _cached_load

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
