"""Exporting a run: a physically smaller model (structured runs) or a compressed file (unstructured runs).

``export_run`` writes ``RUN_DIR/export/`` and adds the figures (params, bytes, CPU latency) to the run record;
``load_pruned`` loads an export in a fresh process from safetensors and the saved config (nothing unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .config import ConfigError, NamedConfig, RunConfig
from .data import DataBundle, load_dataset
from .engine.compressed import compress, decompress
from .engine.patterns import NM, Structured
from .engine.structure import channel_groups
from .engine.surgery import live_channels, param_count, resize_like, shapes_of, shrink
from .models import build_model
from .records import (MODEL_FILE, RESULT_FILE, RecordError, RunRecord, WriteError, read_record, status_words, with_default_mode,
                      write_record)
from .dense import CONFIG_SNAPSHOT, load_run_config
from .runner import load_weights, save_tensors

EXPORT_DIR = "export"
SMALL_MODEL = "model.safetensors"
COMPRESSED = "compressed.safetensors"
DESCRIPTION = "model.json"


def latency_ms(model: nn.Module, inputs: torch.Tensor, repeats: int) -> float:
    """Median CPU forward time (no grad, eval mode) after a short warm-up."""
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(inputs)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(inputs)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def export_model(model: nn.Module, config: RunConfig, data: DataBundle, run_dir: Path, record: RunRecord,
                 measure_latency: bool = True) -> RunRecord:
    """Write the export next to the run and fill the record's export figures.

    The files are written apart first and then put in place, so a new export never mixes with an older one's (a
    stale shrunk model would be loaded first) and a failed one leaves the older in place. ``export/`` may be a link
    to a folder elsewhere: the export goes there, and only the export's own files in it are replaced.
    """
    link = run_dir / EXPORT_DIR
    try:
        final = link.resolve() if link.is_symlink() else link
    except (OSError, RuntimeError) as error:  # a link that loops
        raise ConfigError("RUN_DIR", f"{link} cannot be followed ({error}); allowed: a folder or a link to one") from error
    if final.exists() and not final.is_dir():
        raise ConfigError("RUN_DIR", f"{final} is not a folder; allowed: a folder (or a link to one) for the export")
    if final != link and (final / RESULT_FILE).exists():  # its model.safetensors would be replaced by the shrunk one
        raise ConfigError("RUN_DIR", f"{link} links to {final}, which holds a run; allowed: a link to a folder of the export's own")
    # through a link, or into a folder holding more than an export (a user's notes, a run copied there): only the
    # export's own files are replaced, as swapping the folder whole would delete the rest
    in_place = final != link or (final.is_dir() and any(p.name not in EXPORT_FILES for p in final.iterdir()))
    try:
        (final if in_place else final.parent).mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=final if in_place else final.parent, prefix=".export."))  # never shared
    except OSError as error:  # a run folder made read-only (an archived copy, a teammate's run)
        raise WriteError(final, error.strerror or str(error)) from error
    with_default_mode(partial)
    try:
        record.bytes_before = (run_dir / MODEL_FILE).stat().st_size if (run_dir / MODEL_FILE).exists() else None
        try:
            _write_export(model.cpu().eval(), config, data, partial, record, measure_latency)
        except WriteError as error:  # named by the folder the user asked for, not the temporary one deleted below
            raise WriteError(final, error.reason) from error
        (_move_files_in if in_place else _swap_in)(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


EXPORT_FILES = (DESCRIPTION, SMALL_MODEL, COMPRESSED)


def _swap_in(new: Path, final: Path) -> None:
    """Put the folder ``new`` at ``final``; the older export is deleted only once the new one is in place."""
    older = final.with_name(f"{new.name}.older") if final.exists() else None
    if older:
        final.rename(older)
    try:
        new.rename(final)
    except OSError:
        if older:
            older.rename(final)
        raise
    if older:
        shutil.rmtree(older, ignore_errors=True)


def _move_files_in(new: Path, folder: Path) -> None:
    """Replace the export's own files in a folder that is not patcli's (a link's target): nothing else is touched."""
    for name in EXPORT_FILES:
        (folder / name).unlink(missing_ok=True)
    for path in new.iterdir():
        path.rename(folder / path.name)


def _write_export(model: nn.Module, config: RunConfig, data: DataBundle, out: Path, record: RunRecord,
                  measure_latency: bool) -> None:
    """The export's files, into ``out``: the shrunk model of a structured run, else the compressed weights."""
    example = data.val.inputs[:64].cpu()
    if 0 < len(example) < 64:  # a small validation split: its rows repeated, so "batch 64" is timed on 64
        example = example.repeat(-(-64 // len(example)), *[1] * (example.dim() - 1))[:64]
    # the option's name apart from the model's arguments: a class of one's own may take a `name` of its own
    description = {"model_name": config.model.name, "model": dict(config.model.params), "meta": data.meta}
    if isinstance(config.pattern, Structured):
        groups = channel_groups(model, config.pattern.kind, config.pruning.include, config.pruning.exclude)
        small = shrink(model, groups, live_channels(model, groups)).eval()
        with torch.no_grad():
            torch.testing.assert_close(small(example), model(example), rtol=1e-5, atol=1e-5)
        description["shapes"] = shapes_of(small)
        record.bytes_after = save_tensors(small.state_dict(), out / SMALL_MODEL)
        record.params_after = param_count(small)
        if measure_latency:
            for batch, repeats in ((1, 50), (64, 20)):
                record.latency_ms[f"batch{batch}_before"] = latency_ms(model, example[:batch], repeats)
                record.latency_ms[f"batch{batch}_after"] = latency_ms(small, example[:batch], repeats)
    else:
        if isinstance(config.pattern, NM):
            record.extra["semi_structured"] = semi_structured_plan(model, example.shape[0])
            description["semi_structured"] = record.extra["semi_structured"]
        tensors, metadata = compress(model.state_dict())
        record.bytes_after = save_tensors(tensors, out / COMPRESSED, metadata)
        round_trip = decompress(load_file(str(out / COMPRESSED)), metadata)
        for name, value in model.state_dict().items():
            if not torch.equal(round_trip[name], value.cpu()):
                raise RuntimeError(f"compressed export of {name} does not round-trip exactly")
        record.params_after = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    (out / DESCRIPTION).write_text(json.dumps(description, indent=2, default=str))


def semi_structured_plan(model: nn.Module, tokens: int) -> dict | str:
    """Per 2:4 layer, dense vs sparse-kernel time on this machine's GPU, or why it was not measured."""
    if not torch.cuda.is_available():
        return "no CUDA device here: 2:4 kernels not measured (export on a GPU machine to measure and convert)"
    import copy

    from .engine import semi_structured

    return semi_structured.plan(copy.deepcopy(model).cuda(), tokens)


def export_run(run_dir: Path, measure_latency: bool = True) -> RunRecord:
    """Rebuild a finished run from its own config and weights, export it, and update its result.json."""
    run_dir = Path(run_dir)
    if not os.path.isfile(run_dir / RESULT_FILE) or not os.path.isfile(run_dir / MODEL_FILE):  # never raises, unlike pathlib
        raise ConfigError("RUN_DIR", f"{run_dir} is not a finished patcli run (needs {RESULT_FILE} and {MODEL_FILE})")
    if not os.path.isfile(run_dir / CONFIG_SNAPSHOT):
        raise ConfigError("RUN_DIR", f"{run_dir} has no config snapshot ({CONFIG_SNAPSHOT}) to rebuild its model from")
    try:
        record = read_record(run_dir / RESULT_FILE)
    except RecordError as error:
        raise ConfigError("RUN_DIR", str(error)) from error
    if record.status != "ok":
        raise ConfigError("RUN_DIR", f"{run_dir} is {status_words(record.status)} run; allowed: a finished one")
    config = load_run_config(run_dir, "RUN_DIR")
    now = config.model_dataset_hash()
    if record.model_dataset_hash and now != record.model_dataset_hash:  # an edited text file or config snapshot
        raise ConfigError("RUN_DIR", f"{run_dir}'s model and data no longer match its record (model+data hash {now}, "
                                     f"recorded {record.model_dataset_hash}): its text file (dataset.path) or its config "
                                     "snapshot changed since training; allowed: both as they were at training")
    data = load_dataset(config.dataset)
    model = build_model(config.model, data.meta)
    load_weights(model, run_dir, "RUN_DIR")  # a damaged or foreign model file is one line, as for dense= and init_from=
    if config.needs_dense:  # a baseline: export what it pruned
        from .baselines import as_pruned

        config = as_pruned(config, model)
    export_model(model, config, data, run_dir, record, measure_latency)
    write_record(run_dir, record)
    return record


def _status(record_path: Path) -> str | None:
    """A run record's status, None where there is no readable one."""
    try:
        return read_record(record_path).status
    except RecordError:
        return None


def load_pruned(path: str | Path, device: str | None = None) -> nn.Module:
    """Load an export (``RUN_DIR/export`` or the run directory itself) as a plain nn.Module in eval mode.

    With ``device="cuda"``, 2:4 layers the export measured as faster with sparse kernels are converted (fp16).
    """
    path = Path(path)
    if os.path.isdir(path / EXPORT_DIR):  # os.path never raises, unlike pathlib (a name too long)
        path = path / EXPORT_DIR
    if not os.path.isfile(path / DESCRIPTION):
        status = _status(path / RESULT_FILE)
        hint = (f"; run `patcli export {path}` first" if status == "ok"
                else f": its run did not finish (status {status}), so there is nothing to export" if status else "")
        raise FileNotFoundError(f"{path} holds no export ({DESCRIPTION}){hint}")
    try:
        description = json.loads((path / DESCRIPTION).read_text())
        model_config = dict(description["model"])
        # exports written before model_name existed kept the name among the arguments
        name = description["model_name"] if "model_name" in description else model_config.pop("name")
        meta = description["meta"]
        structured = "shapes" in description  # a shrunk model, else the compressed weights of the full-size one
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path / DESCRIPTION} is damaged or not a patcli export ({error.__class__.__name__}: {error}); "
                         "allowed: the files `patcli export` writes: run it again") from error
    weights = path / (SMALL_MODEL if structured else COMPRESSED)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing from the export; run `patcli export` on its run again")
    try:
        model = build_model(NamedConfig(name, model_config), meta)
    except (KeyError, TypeError, AttributeError) as error:  # a ConfigError (a model refused) says what it is
        raise ValueError(f"{path / DESCRIPTION} is damaged or not a patcli export: its model cannot be built "
                         f"({error.__class__.__name__}: {error}); allowed: the files `patcli export` writes: run it "
                         "again") from error
    try:
        if structured:
            resize_like(model, description["shapes"])
            model.load_state_dict(load_file(str(weights)))
        else:
            with safe_open(str(weights), framework="pt") as handle:
                metadata = handle.metadata() or {}
            model.load_state_dict(decompress(load_file(str(weights)), metadata))
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError, OSError) as error:
        raise ValueError(f"{weights} does not load into the model {DESCRIPTION} describes ({error.__class__.__name__}: "
                         f"{error}); allowed: the files `patcli export` writes: run it again") from error
    plan = description.get("semi_structured")
    if device == "cuda" and isinstance(plan, dict):
        from .engine import semi_structured

        return semi_structured.apply(model, plan).eval()
    return model.to(device).eval() if device else model.eval()
