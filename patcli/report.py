"""Comparison tables from run records: PAT and post-training baselines side by side, per model and dataset.

Reads ``result.json`` files only (never models), so it is fast and works on a cluster's output. Rows are
methods (dense, each PAT recipe, each baseline), columns target sparsities, cells the metric pooled over seeds
and cross-validation folds (mean ± std, n) with its difference to dense; the best cell per column is marked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .records import RecordError, RunRecord, find_record_files, read_record

POST_ORDER = ["post:magnitude", "post:gradient", "post:structured", "post:iterative"]


@dataclass
class Cell:
    """One (row, sparsity) cell: the metric of every run (seed, fold) of it."""

    values: list[float] = field(default_factory=list)
    achieved: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    cites: dict[str, float | None] = field(default_factory=dict)  # dense runs its runs started from → their metric
    dense_value: float | None = None  # what its difference to dense is taken against

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Row:
    label: str
    method: str
    cells: dict[float, Cell] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)
    training: str = ""  # the training settings it shares with the dense run it compares with (see ``training_key``)
    cites: dict[str, float | None] = field(default_factory=dict)  # dense runs its records started from → their metric

    def steps_text(self) -> str:
        if not self.steps:
            return "-"
        low, high = min(self.steps), max(self.steps)
        return f"{low:,}" if low == high else f"{low:,}–{high:,}"


@dataclass
class GroupTable:
    """Every comparable run of one model + dataset config."""

    model: str
    dataset: str
    config_hash: str
    metric: str
    split: str
    higher_is_better: bool
    dense: Row | None = None
    rows: dict[str, Row] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.model} on {self.dataset} [{self.config_hash}] — {self.split} {self.metric}"

    @property
    def columns(self) -> list[float]:
        """The target sparsities of the rows; a table of dense runs alone has the dense column."""
        return sorted({s for row in self.rows.values() for s in row.cells}) or ([0.0] if self.dense else [])

    @property
    def dense_value(self) -> float | None:
        return self.dense.cells[0.0].mean if self.dense and 0.0 in self.dense.cells else None

    def ordered_rows(self) -> list[Row]:
        def rank(row: Row) -> tuple:
            if row.method == "pat":
                return (0, row.label)
            if row.method in POST_ORDER:
                return (1, POST_ORDER.index(row.method), row.label)
            return (2, row.label)

        return sorted(self.rows.values(), key=rank)

    def best(self, column: float) -> float | None:
        """The best mean among the rows in ``column``; in the 0% column the reference dense row competes too."""
        competing = [*self.rows.values(), *([self.dense] if self.dense and column == 0.0 else [])]
        means = [row.cells[column].mean for row in competing if column in row.cells]
        if not means:
            return None
        return max(means) if self.higher_is_better else min(means)


    def dense_is_best(self, column: float) -> bool:
        """Where the reference dense row is marked: in a 0% column (other dense setups) that it leads."""
        return column == 0.0 and self.dense is not None and self.dense.cells[0.0].mean == self.best(column)


@dataclass
class Comparison:
    groups: list[GroupTable]
    not_ok: list[RunRecord]
    repeats: list[str] = field(default_factory=list)  # runs counted once: the same recipe, sparsity, seed, fold, start
    without_metric: list[str] = field(default_factory=list)  # finished runs left out: no value of the metric shown

    @property
    def has_values(self) -> bool:
        """Whether any finished run has the metric shown: without one there is no table to read and nothing to plot."""
        return any(group.dense or group.rows for group in self.groups)


def row_label(record: RunRecord) -> str:
    return f"PAT {record.recipe}" if record.method == "pat" else record.recipe


def load_records(paths: list[Path]) -> tuple[list[RunRecord], list[str]]:
    """Readable records under ``paths``, each run once, and one line per file that could not be read.

    A file reached twice (``DIR DIR``, or a folder and a record inside it) is read once; a copy of a run (same
    ``run_id``) is skipped with a warning: pooling a run with itself would count it twice and shrink the std.
    """
    records, skipped = [], []
    files: set[Path] = set()
    runs: dict[str, Path] = {}  # run_id → the file that holds it
    for path in find_record_files(paths):
        if path.resolve() in files:
            continue
        files.add(path.resolve())
        try:
            record = read_record(path)
        except RecordError as error:
            skipped.append(str(error))
            continue
        if record.run_id in runs:
            skipped.append(f"{path}: the same run (run_id {record.run_id}) as {runs[record.run_id]}")
            continue
        if record.run_id:
            runs[record.run_id] = path
        records.append(record)
    return records, skipped


# Settings that never make two runs different methods: seeds are pooled, sparsity is the column, the rest is where
# or on what hardware a run happened. Cross-validation folds pool too, see ``settings``.
# How often a run is evaluated changes no weight either.
NOT_IDENTITY = {"seed", "scorer.seed", "regrowth.seed", "pruning.sparsity", "dense", "output_root", "trainer.device",
                "trainer.threads", "trainer.init_from", "trainer.eval_every"}
SUB_SEEDS = ("scorer.seed", "regrowth.seed")  # the random masks' own seeds (the run's seed by default): samples too


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def settings(record: RunRecord) -> dict[str, object]:
    """The record's flat config, its fold replaced by whether it has one: the folds of a cross-validation pool
    together, never with runs of the fixed validation split (which they overlap)."""
    flat = flatten(record.config)
    flat["cross_validation"] = flat.pop("dataset.val_fold", None) is not None
    return flat


# What only PAT reads: a dense run or a post-training baseline given these ran exactly as without them.
PAT_ONLY = ("scorer.", "schedule.", "allocation.", "regrowth.", "regularizer.", "pruning.frequency", "pruning.masking")


def identity_settings(record: RunRecord) -> dict[str, object]:
    """What makes two records the same recipe: their whole config except seed, fold, sparsity and locations, and
    except the PAT settings a dense run or a post-training baseline does not read, or that the run's other choices
    overrode (its record's ``inert``: allocation under 2:4, pruning.frequency under the alternating schedule)."""
    if record.method != "pat":
        unused = PAT_ONLY
    else:
        inert = record.extra.get("inert")
        unused = tuple(k for k in inert if isinstance(k, str)) if isinstance(inert, list) else ()
    if record.method == "dense":  # nothing is pruned: the cap is inert (a cached dense reference does not record it)
        unused += ("pruning.max_layer_sparsity",)
    return {k: v for k, v in settings(record).items() if k not in NOT_IDENTITY and not k.startswith(unused)}


def identity(record: RunRecord) -> str:
    return json.dumps(identity_settings(record), sort_keys=True, default=str)


def training_key(record: RunRecord) -> str:
    """The settings a row shares with the dense run it should be compared with: everything but what pruning,
    baselines and seeds add (a PAT run at trainer.epochs=10 compares with the dense run at trainer.epochs=10)."""
    flat = {k: v for k, v in settings(record).items()
            if k not in NOT_IDENTITY and not k.startswith(PAT_ONLY + ("pruning.", "baseline."))}
    return json.dumps(flat, sort_keys=True, default=str)


def copies_of_dense_runs(records: list[RunRecord]) -> dict[str, str]:
    """Each dense run's id → one key for all copies of its training (model and data, training settings, seed, fold
    and steps, so a run continued from another is apart): what started from one copy repeats what started from
    another. Dense runs among ``records`` give their own; one known only by citation gets it from a baseline citing
    it, which records the dense run's seed and trains as it did."""
    def key(record: RunRecord, steps: int | None) -> str:
        fold = flatten(record.config).get("dataset.val_fold")
        return json.dumps([record.model_dataset_hash, training_key(record), record.seed, fold, steps])

    ok = [r for r in records if r.status == "ok"]
    cited = {r.dense_reference["run_id"]: key(r, r.dense_reference.get("train_steps")) for r in ok
             if (r.dense_reference or {}).get("run_id") and "baseline" in r.extra}
    return {**cited, **{r.run_id: key(r, r.total_train_steps) for r in ok if r.method == "dense" and r.run_id}}


def compare(records: list[RunRecord], metric: str | None = None, split: str = "test") -> Comparison:
    """Group ok records by model+dataset, pool seeds per (recipe, sparsity), and keep the rest apart."""
    groups: dict[str, GroupTable] = {}
    keyed: dict[str, dict[tuple[str, str], Row]] = {}  # group → (label, identity) → row
    configs: dict[tuple[str, str, str], dict] = {}
    references: dict[str, RunRecord] = {}  # dense run (id, or dir for older records) → one record that cites it
    dense_rows_of: dict[str, Row] = {}  # id and dir of each dense run among the records → its row
    seen: dict[tuple, str] = {}  # (group, recipe, sparsity, seed, fold, starting weights) → the run counted for it
    dense_samples: dict[tuple, str] = {}  # (group, training, seed, fold) of each dense run counted → where it is
    repeats: list[str] = []
    without_metric: list[str] = []
    same_start = copies_of_dense_runs(records)
    for record in (r for r in records if r.status == "ok"):
        name = metric or record.primary_metric
        higher = record.higher_is_better if name == record.primary_metric else name == "accuracy"
        value = record.metrics.get(split, {}).get(name)
        if value is None:
            without_metric.append(f"{record.run_dir}: no {split} {name} in its record, left out")
            continue
        group = groups.setdefault(record.model_dataset_hash, GroupTable(
            record.model, record.dataset, record.model_dataset_hash, name, split, higher))
        label, key = row_label(record), identity(record)
        column = 0.0 if record.method == "dense" else round(record.target_sparsity, 6)
        flat = flatten(record.config)
        # the same seed from other weights (another dense run, trainer.init_from) is another sample
        fold = flat.get("dataset.val_fold")
        cited = (record.dense_reference or {}).get("run_id")
        # a baseline starts from its dense run, whatever trainer.init_from says (prune-post warns it does not apply)
        from_dense = record.method.startswith("post:") or flat.get("baseline.name") not in (None, "none")
        start = (same_start.get(cited, cited), None if from_dense else flat.get("trainer.init_from"))
        # a PAT run's random masks have seeds of their own; nothing else reads them
        seeds = (record.seed, *(flat.get(k) for k in SUB_SEEDS)) if record.method == "pat" else (record.seed,)
        first = seen.setdefault((record.model_dataset_hash, label, key, column, seeds, fold, start), record.run_dir)
        if first != record.run_dir:  # a repeat is no new sample: pooling it would shrink the std
            repeats.append(f"{record.run_dir}: the same recipe, sparsity and seed{'' if fold is None else ' and fold'} "
                           f"as {first}, counted once")
            if record.method == "dense":  # records citing the repeat find the row that counted its twin
                twin = keyed[record.model_dataset_hash][(label, key)]
                dense_rows_of.update({i: twin for i in (record.run_id, str(Path(record.run_dir).resolve())) if i})
            continue
        row = keyed.setdefault(record.model_dataset_hash, {}).setdefault(
            (label, key), Row(label, record.method, training=training_key(record)))
        configs[(record.model_dataset_hash, label, key)] = identity_settings(record)  # labels name what sets rows apart
        _add(row, column, value, record)
        if record.method == "dense":
            dense_rows_of.update({ident: row for ident in (record.run_id, str(Path(record.run_dir).resolve())) if ident})
            if start[1] is None:  # a dense run continued from another (dense+init) is no plain seed
                dense_samples[(record.model_dataset_hash, row.training, record.seed, fold)] = record.run_dir
        elif record.dense_reference:
            cited = record.dense_reference
            ident = cited.get("run_id") or str(Path(cited.get("run_dir", "")).resolve())
            references.setdefault(ident, record)
            row.cites[ident] = row.cells[column].cites[ident] = (cited.get("metrics") or {}).get(split, {}).get(name)
    for group_key, rows in keyed.items():
        group = groups[group_key]
        _disambiguate(rows, {k[1:]: v for k, v in configs.items() if k[0] == group_key})
        # the plain dense rows; dense+init (continued from a run) only where a baseline starts from it
        cited = [dense_rows_of[c] for c in references if c in dense_rows_of]
        dense_rows = ([row for (label, _), row in rows.items() if label == "dense"]
                      or [row for row in rows.values() if any(row is c for c in cited)])
        if dense_rows:  # the dense configuration with the most runs is the reference; others stay rows
            group.dense = reference_dense(dense_rows)
        group.rows = {}
        for row in (row for row in rows.values() if row is not group.dense):
            label, n = row.label, 1
            while row.label in group.rows:  # settings that print alike (1 and "1"): both rows stay, numbered
                n += 1
                row.label = f"{label} #{n}"
            group.rows[row.label] = row
    # dense runs known only through the records that cite them, one row per training (epochs, lr, ...)
    cited_only: dict[str, dict[str, Row]] = {}
    for cited, record in references.items():
        group = groups[record.model_dataset_hash]
        value = (record.dense_reference.get("metrics") or {}).get(split, {}).get(group.metric)
        if cited in dense_rows_of or value is None:
            continue
        training = training_key(record)
        # a baseline records its dense run's seed (a PAT run given dense= keeps its own): that seed is counted already
        sample = (record.model_dataset_hash, training, record.seed, flatten(record.config).get("dataset.val_fold"))
        if "baseline" in record.extra and sample in dense_samples:
            repeats.append(f"the dense run {cited} cited by {record.run_dir}: the same training and seed as "
                           f"{dense_samples[sample]}, counted once")
            continue
        dense_samples[sample] = cited
        plain = group.dense is not None and group.dense.label.partition(" [")[0] == "dense"  # not dense+init
        if plain and group.dense.training == training:
            row = group.dense
        else:
            row = cited_only.setdefault(record.model_dataset_hash, {}).setdefault(training, Row("dense", "dense", training=training))
        _add(row, 0.0, value, None, steps=record.dense_reference.get("train_steps"))
    for group_key, by_training in cited_only.items():
        group = groups[group_key]
        if group.dense is None:  # the training cited most is the reference, labelled when there are others
            _disambiguate({("dense", t): row for t, row in by_training.items()}, {("dense", t): json.loads(t) for t in by_training})
            group.dense = reference_dense(list(by_training.values()))
    for group_key, group in groups.items():
        dense_rows = [row for row in keyed.get(group_key, {}).values() if row.method == "dense" and 0.0 in row.cells]
        dense_rows += cited_only.get(group_key, {}).values()
        for row in group.rows.values():
            for cell in row.cells.values():
                cell.dense_value = _dense_value_for(cell, row, group, dense_rows, dense_rows_of, same_start)
        if group.dense is not None:
            group.dense.cells[0.0].dense_value = group.dense_value
    not_ok = [r for r in records if r.status != "ok"]
    return Comparison(sorted(groups.values(), key=lambda g: (g.model, g.dataset, g.config_hash)), not_ok, repeats,
                      without_metric)


def reference_dense(rows: list[Row]) -> Row:
    """The dense row with the most runs; on a tie the fixed validation split's, then by label: never the order in
    which the paths were given."""
    def rank(row: Row) -> tuple:
        cross_validated = bool(json.loads(row.training or "{}").get("cross_validation"))
        return -row.cells[0.0].n, cross_validated, row.label

    return min(rows, key=rank)


def _dense_value_for(cell: Cell, row: Row, group: GroupTable, dense_rows: list[Row], dense_rows_of: dict[str, Row],
                     copies: dict[str, str]) -> float | None:
    """The dense result a cell's difference is taken against: the dense runs its baselines started from (their own
    results, not their row's, which may pool other seeds; copies of one dense run count once, as in the dense row),
    else the dense run its row's baselines started from, else the dense run trained the same way (same trainer,
    model, data), else the group's dense row."""
    if row.method == "dense":
        return group.dense_value
    values = {copies.get(c, c): v for c, v in cell.cites.items()}
    if values and None not in values.values():
        return statistics.fmean(values.values())
    cited = {id(dense_rows_of[c]): dense_rows_of[c] for c in row.cites if c in dense_rows_of}
    if len(cited) == 1:
        return next(iter(cited.values())).cells[0.0].mean
    same = [d for d in dense_rows if d.training == row.training]
    if len(same) == 1:
        return same[0].cells[0.0].mean
    return group.dense_value


def _disambiguate(rows: dict[tuple[str, str], Row], configs: dict[tuple[str, str], dict]) -> None:
    """Rows that share a label but not a config get the settings that tell them apart, e.g. ``[trainer.epochs=100]``."""
    by_label: dict[str, list[tuple[str, str]]] = {}
    for key in rows:
        by_label.setdefault(key[0], []).append(key)
    for label, keys in by_label.items():
        if len(keys) < 2:
            continue
        flats = [configs[k] for k in keys]
        differing = sorted({name for flat in flats for name in flat
                            if name not in NOT_IDENTITY and len({_setting(f, name, json.dumps) for f in flats}) > 1})
        for key, flat in zip(keys, flats):
            detail = ", ".join(f"{name}={_setting(flat, name, str)}" for name in differing)
            rows[key].label = f"{label} [{detail}]"


def _setting(flat: dict, name: str, text) -> str:
    """A record of an older patcli may lack a key that another has as null: those differ too."""
    return text(flat[name]) if name in flat else "(unset)"


def _add(row: Row, column: float, value: float, record: RunRecord | None, steps: int | None = None) -> None:
    cell = row.cells.setdefault(column, Cell())
    cell.values.append(value)
    if record is not None:
        cell.achieved.append(record.achieved_sparsity)
        cell.seeds.append(record.seed)
        row.steps.add(record.total_train_steps)
    elif steps is not None:
        row.steps.add(steps)


# -- rendering ------------------------------------------------------------------------------------------------------


def scale(metric: str) -> float:
    """Accuracy is shown in percent; losses and perplexities as they are."""
    return 100.0 if metric == "accuracy" else 1.0


def fmt(value: float, metric: str) -> str:
    return f"{value * scale(metric):.1f}" if metric == "accuracy" else f"{value:.3f}"


def runs_text(rows: list[Row]) -> str:
    counts = {cell.n for row in rows for cell in row.cells.values()}
    return str(counts.pop()) if len(counts) == 1 else f"{min(counts)}–{max(counts)}"


def cell_text(cell: Cell, group: GroupTable, dense: float | None = None) -> str:
    """``97.2±0.3 (+0.4)``: mean ± std over runs, and the difference to ``dense`` (the row's own) in the same units."""
    text = fmt(cell.mean, group.metric)
    if cell.n > 1:
        text += f"±{fmt(cell.std, group.metric)}"
    if dense is not None:
        text += f" ({(cell.mean - dense) * scale(group.metric):+.{1 if group.metric == 'accuracy' else 3}f})"
    return text


def column_label(column: float) -> str:
    return f"{column * 100:g}%"


def rich_tables(comparison: Comparison):
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    tables = []
    for group in comparison.groups:
        columns = group.columns
        rows = group.ordered_rows()
        table = Table(title=escape(group.title), title_justify="left", box=box.SIMPLE_HEAD)
        table.add_column("method", min_width=24, ratio=3)
        table.add_column("steps", justify="right", no_wrap=True)
        table.add_column("runs", justify="right", no_wrap=True)
        for column in columns:
            table.add_column(column_label(column), justify="right", min_width=8, ratio=1)
        if group.dense:
            dense_cell = group.dense.cells[0.0]
            table.add_row(escape(group.dense.label), group.dense.steps_text(), str(dense_cell.n),
                          *[f"[bold green]{cell_text(dense_cell, group)}[/]" if group.dense_is_best(c) else
                            f"[dim]{cell_text(dense_cell, group)}[/]" for c in columns])
        for row in rows:
            cells = []
            for column in columns:
                cell = row.cells.get(column)
                if cell is None:
                    cells.append("-")
                    continue
                text = cell_text(cell, group, cell.dense_value)
                cells.append(f"[bold green]{text}[/]" if cell.mean == group.best(column) else text)
            table.add_row(escape(row.label), row.steps_text(), runs_text([row]), *cells)
        direction = "higher" if group.higher_is_better else "lower"
        unit = "%, " if group.metric == "accuracy" else ""
        table.caption = (f"{unit}mean±std over runs, i.e. seeds and folds (difference to dense); best per column in bold green "
                         f"({direction} is better); steps = all training steps, dense run included")
        tables.append(table)
    if comparison.not_ok:
        table = Table(title="runs that did not finish ok", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("status", "method", "target", "run dir", "error"):
            table.add_column(column)
        for record in comparison.not_ok:
            table.add_row(record.status, escape(row_label(record)), f"{record.target_sparsity:g}", escape(record.run_dir),
                          escape((record.error or "")[:120]))
        tables.append(table)
    return tables


def long_rows(comparison: Comparison) -> list[dict]:
    """One flat row per (group, method, sparsity): what csv and json formats carry."""
    rows = []
    for group in comparison.groups:
        entries = ([(group.dense, 0.0)] if group.dense else []) + [
            (row, column) for row in group.ordered_rows() for column in sorted(row.cells)
        ]
        for row, column in entries:
            cell = row.cells[column]
            dense = cell.dense_value
            rows.append({
                "model": group.model, "dataset": group.dataset, "config_hash": group.config_hash,
                "method": row.method, "row": row.label, "target_sparsity": column,
                "achieved_sparsity": statistics.fmean(cell.achieved) if cell.achieved else column,
                "split": group.split, "metric": group.metric, "mean": cell.mean,
                "std": cell.std if cell.n > 1 else None, "n": cell.n,  # one run has no spread to show
                "delta_vs_dense": None if dense is None else cell.mean - dense,
                "higher_is_better": group.higher_is_better,
                # numbers, not the table's "1,100–1,200": the runs pooled in a row may have trained for different steps
                "train_steps_min": min(row.steps, default=None), "train_steps_max": max(row.steps, default=None),
            })
    return rows


CSV_FIELDS = ["model", "dataset", "config_hash", "method", "row", "target_sparsity", "achieved_sparsity", "split", "metric",
              "mean", "std", "n", "delta_vs_dense", "higher_is_better", "train_steps_min", "train_steps_max", "status",
              "run_dir", "error"]


def not_ok_rows(comparison: Comparison) -> list[dict]:
    """One csv row per run that did not finish ok: a csv has no second table, so they come with their status and
    error, the sparsity they reached and no metric (nor steps: a baseline's record of them lacks its dense run's)."""
    return [{"model": r.model, "dataset": r.dataset, "config_hash": r.model_dataset_hash, "method": r.method,
             "row": row_label(r), "target_sparsity": r.target_sparsity, "achieved_sparsity": r.achieved_sparsity,
             "status": r.status, "run_dir": r.run_dir, "error": r.error or ""} for r in comparison.not_ok]


def to_csv(comparison: Comparison) -> str:
    """Finished rows (status ok), then the runs that did not finish ok, as the table lists them apart."""
    rows = [{**row, "status": "ok"} for row in long_rows(comparison)] + not_ok_rows(comparison)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_json(comparison: Comparison) -> str:
    not_ok = [{"status": r.status, "row": row_label(r), "recipe": r.recipe, "target_sparsity": r.target_sparsity,
               "run_dir": r.run_dir, "error": r.error} for r in comparison.not_ok]
    return json.dumps({"rows": long_rows(comparison), "not_ok": not_ok}, indent=2) + "\n"


def to_markdown(comparison: Comparison) -> str:
    parts = []
    for group in comparison.groups:
        columns = group.columns
        header = ["method", "steps", "runs"] + [column_label(c) for c in columns]
        lines = [f"**{group.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        if group.dense:
            dense = group.dense.cells[0.0]
            lines.append("| " + " | ".join([group.dense.label, group.dense.steps_text(), str(dense.n)]
                                           + [f"**{cell_text(dense, group)}**" if group.dense_is_best(c) else
                                              cell_text(dense, group) for c in columns]) + " |")
        for row in group.ordered_rows():
            cells = []
            for column in columns:
                cell = row.cells.get(column)
                text = "-" if cell is None else cell_text(cell, group, cell.dense_value)
                cells.append(f"**{text}**" if cell is not None and cell.mean == group.best(column) else text)
            lines.append("| " + " | ".join([row.label, row.steps_text(), runs_text([row])] + cells) + " |")
        parts.append("\n".join(lines))
    if comparison.not_ok:
        lines = ["**Runs that did not finish ok**", "", "| status | method | target | run dir | error |", "|---|---|---|---|---|"]
        lines += [f"| {r.status} | {row_label(r)} | {r.target_sparsity:g} | {r.run_dir} | {table_text(r.error or '')[:120]} |"
                  for r in comparison.not_ok]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def table_text(text: str) -> str:
    """An error message as one markdown cell: a newline or a pipe in it would end the row or the cell."""
    return " ".join(text.split()).replace("|", "\\|")


MARKERS = "os^DvPX"  # 7 markers against matplotlib's 10 colours: the first 70 rows of a panel all look different


def line_styles(count: int) -> list[dict[str, str]]:
    """A colour and marker per row; colours alone repeat after 10 rows, and two rows would share a legend entry."""
    return [{"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]} for i in range(count)]


def plot(comparison: Comparison, path: Path) -> None:
    """Metric vs target sparsity, one panel per group; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = comparison.groups or []
    figure, axes = plt.subplots(1, max(len(groups), 1), figsize=(6.5 * max(len(groups), 1), 4.5), squeeze=False)
    for axis, group in zip(axes[0], groups):
        factor = scale(group.metric)
        rows = group.ordered_rows()
        for row, style in zip(rows, line_styles(len(rows))):
            columns = sorted(row.cells)
            axis.errorbar([c * 100 for c in columns], [row.cells[c].mean * factor for c in columns],
                          yerr=[row.cells[c].std * factor for c in columns], capsize=3, label=row.label, **style)
        if group.dense_value is not None:
            axis.axhline(group.dense_value * factor, color="black", linestyle="--", label="dense")
        axis.set_xlabel("target sparsity (%)")
        axis.set_ylabel(f"{group.split} {group.metric}" + (" (%)" if group.metric == "accuracy" else ""))
        axis.set_title(f"{group.model} on {group.dataset}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    partial = Path(path).with_name(f".{Path(path).name}.tmp{Path(path).suffix}")  # the format follows the suffix
    try:
        figure.savefig(partial, dpi=120)
        os.replace(partial, path)  # as --output: a reader never sees half an image
    finally:
        partial.unlink(missing_ok=True)
        plt.close(figure)
