"""Runs read from the loggers' files: ``CSVLogger``'s ``metrics.csv`` or ``TensorBoardLogger``'s event files."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from lightning_msign.metric_keys import EPOCH

__all__ = ["CSV_NAME", "EVENTS_MARK", "SEARCH_DEPTH", "Run", "Series", "load_run"]

CSV_NAME = "metrics.csv"
EVENTS_MARK = "tfevents"
SEARCH_DEPTH = 4  # subfolder levels searched below a parent folder (logs/ -> csv/<name>/version_N is 3)
_VERSION_RE = re.compile(r"^version_(\d+)$")
_SKIP_DIRS = {"checkpoints", "__pycache__"}

#: ``(steps, values)`` of one key: steps ``int64`` ascending and unique, values ``float64``.
Series = tuple[np.ndarray, np.ndarray]


@dataclass
class Run:
    """The logged metrics of one run.

    Args:
        name: label used in the legend and the tables.
        path: the folder or file the metrics were read from.
        source: ``"csv"`` or ``"tensorboard"``.
        metrics: ``{key: (steps, values)}``, steps ``int64`` ascending and unique, values ``float64``
            (NaN/Inf kept as logged).
        notes: what the loader chose or dropped (a newest version picked, duplicate steps, ...).
    """

    name: str
    path: Path
    source: str
    metrics: dict[str, Series]
    notes: list[str] = field(default_factory=list)

    def __contains__(self, key: object) -> bool:
        return key in self.metrics

    def series(self, key: str) -> Optional[Series]:
        """``(steps, values)`` of ``key``, or ``None`` when the run did not log it."""
        return self.metrics.get(key)

    def first_key(self, keys: Sequence[str]) -> Optional[str]:
        """The first of ``keys`` this run logged, or ``None``."""
        return next((k for k in keys if k in self.metrics), None)

    @property
    def step_range(self) -> tuple[int, int]:
        """First and last step at which anything was logged."""
        firsts = [int(s[0]) for s, _ in self.metrics.values()]
        lasts = [int(s[-1]) for s, _ in self.metrics.values()]
        return min(firsts), max(lasts)


def load_run(path: Union[str, os.PathLike], label: Optional[str] = None) -> Run:
    """Read the metrics of one run.

    ``path`` may be a ``CSVLogger`` version folder (holding ``metrics.csv``), a ``metrics.csv`` file
    (any ``.csv`` with a ``step`` column), a ``TensorBoardLogger`` version folder or one of its
    ``events.out.tfevents.*`` files, or a parent folder holding exactly one run (searched
    ``SEARCH_DEPTH`` levels deep). When that parent holds several versions of one run
    (``version_0``, ``version_1``, ...) the newest is read and a note says so. A folder holding both
    ``metrics.csv`` and event files is read from the CSV (full precision). All event files of a
    TensorBoard folder are read in name order; CSV rows are sparse (one row per ``log_metrics``
    call) and are merged per key. When a key was logged twice at one step, the last value is kept.

    Args:
        path: folder or file, as above.
        label: name of the run in the report; default: derived from the path
            (``<name>/version_<n>`` for a logger's version folder).

    Returns:
        The :class:`Run`.

    Raises:
        ValueError: ``path`` does not exist, is not a metrics file, holds no run or several runs (the
            message lists them), or holds no metrics; ``label`` is not a non-empty string.
    """
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ValueError(f"`label` must be a non-empty string or None, got {label!r}")
    given = Path(path)
    if not given.exists():
        raise ValueError(f"`path` does not exist: {str(given)!r}")
    notes: list[str] = []
    if given.is_file():
        kind = _file_kind(given)
        if kind is None:
            raise ValueError(
                f"`path` {str(given)!r} is neither a CSV file ({CSV_NAME}) nor a TensorBoard event file"
                " (events.out.tfevents.*)"
            )
        source_dir, files = given.parent, [given]
        label_path = given.parent
    else:
        kind, source_dir = _find_run_dir(given, notes)
        files = [source_dir / CSV_NAME] if kind == "csv" else _event_files(source_dir)
        label_path = source_dir
    if kind == "csv":
        raw, read_notes = _read_csv(files[0])
    else:
        raw, read_notes = _read_events(files)
    notes.extend(read_notes)
    metrics, duplicates = _finish(raw)
    if duplicates:
        notes.append(f"{duplicates} values logged again at an already logged step were replaced by the later value")
    if not metrics:
        raise ValueError(f"`path` {str(given)!r} holds no logged metrics (read {', '.join(str(f) for f in files)})")
    name = label if label is not None else _default_label(label_path)
    return Run(name=name, path=files[0] if given.is_file() else source_dir, source=kind, metrics=metrics, notes=notes)


def _file_kind(path: Path) -> Optional[str]:
    if path.suffix.lower() == ".csv":
        return "csv"
    if EVENTS_MARK in path.name:
        return "tensorboard"
    return None


def _event_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and EVENTS_MARK in p.name)


def _dir_kind(folder: Path) -> Optional[str]:
    """``"csv"``, ``"tensorboard"`` or ``None`` for the files directly in ``folder``."""
    if (folder / CSV_NAME).is_file():
        return "csv"
    if _event_files(folder):
        return "tensorboard"
    return None


def _find_run_dir(folder: Path, notes: list[str]) -> tuple[str, Path]:
    kind = _dir_kind(folder)
    if kind is not None:
        if kind == "csv" and _event_files(folder):
            notes.append(f"{folder} holds both {CSV_NAME} and TensorBoard event files; read {CSV_NAME}")
        return kind, folder

    found: list[tuple[str, Path]] = []

    def walk(current: Path, depth: int) -> None:
        try:
            children = sorted(p for p in current.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name in _SKIP_DIRS or child.name.startswith("."):
                continue
            child_kind = _dir_kind(child)
            if child_kind is not None:
                found.append((child_kind, child))
            elif depth < SEARCH_DEPTH:
                walk(child, depth + 1)

    walk(folder, 1)
    if not found:
        raise ValueError(
            f"`path` {str(folder)!r} holds no run: no {CSV_NAME} and no events.out.tfevents.* file in it"
            f" or in its subfolders ({SEARCH_DEPTH} levels searched)"
        )
    groups = {(k, p.parent) for k, p in found}
    if len(groups) > 1:
        listing = "\n".join(f"  {k}: {p}" for k, p in found)
        raise ValueError(
            f"`path` {str(folder)!r} holds {len(found)} runs in {len(groups)} places; pass one of them:\n{listing}"
        )
    kind, chosen = max(found, key=lambda kp: _version_key(*kp))
    if len(found) > 1:
        others = ", ".join(p.name for _, p in found if p != chosen)
        notes.append(f"{chosen.parent} holds {len(found)} versions; read the newest, {chosen.name} (not {others})")
    return kind, chosen


def _version_key(kind: str, folder: Path) -> tuple[int, float]:
    """Newest first by ``version_<n>`` number, then by modification time of the metrics files."""
    match = _VERSION_RE.match(folder.name)
    number = int(match.group(1)) if match else -1
    files = [folder / CSV_NAME] if kind == "csv" else _event_files(folder)
    mtime = max((f.stat().st_mtime for f in files), default=0.0)
    return number, mtime


def _default_label(folder: Path) -> str:
    folder = folder.resolve()
    if _VERSION_RE.match(folder.name) and folder.parent.name:
        return f"{folder.parent.name}/{folder.name}"
    return folder.name or str(folder)


RawMetrics = dict[str, tuple[list[int], list[float]]]


def _read_csv(path: Path) -> tuple[RawMetrics, list[str]]:
    raw: RawMetrics = {}
    no_step = unparsable = 0
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise ValueError(f"`path` {str(path)!r} is empty: no header row")
            if "step" not in columns:
                shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
                raise ValueError(
                    f"`path` {str(path)!r} has no 'step' column (columns: {shown}); is it a CSVLogger {CSV_NAME}?"
                )
            for row in reader:
                step_text = row.get("step")
                try:
                    step = int(float(step_text)) if step_text else None
                except ValueError:
                    step = None
                if step is None:
                    no_step += 1
                    continue
                for key, text in row.items():
                    if key is None or key == "step" or not isinstance(text, str) or text == "":
                        continue
                    try:
                        value = float(text)
                    except ValueError:
                        unparsable += 1
                        continue
                    steps, values = raw.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    except (csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"`path` {str(path)!r} is not a readable CSV file: {err}") from err
    notes = []
    if no_step:
        notes.append(f"{no_step} CSV rows without a step were skipped")
    if unparsable:
        notes.append(f"{unparsable} CSV cells that are not numbers were skipped")
    return raw, notes


def _read_events(paths: Sequence[Path]) -> tuple[RawMetrics, list[str]]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.util import tensor_util

    raw: RawMetrics = {}
    for path in paths:
        try:
            for event in LegacyEventFileLoader(str(path)).Load():
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    kind = value.WhichOneof("value")
                    if kind == "simple_value":
                        number = float(value.simple_value)
                    elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
                        array = tensor_util.make_ndarray(value.tensor)
                        if array.size != 1:
                            continue
                        number = float(array.reshape(()))
                    else:  # hparams, histograms, images, text
                        continue
                    steps, values = raw.setdefault(value.tag, ([], []))
                    steps.append(int(event.step))
                    values.append(number)
        except Exception as err:  # the loader raises protobuf/IO errors of several kinds
            raise ValueError(f"`path` {str(path)!r} is not a readable TensorBoard event file: {err}") from err
    return raw, []


def _finish(raw: RawMetrics) -> tuple[dict[str, Series], int]:
    """Sort every key by step and keep the last value logged at each step."""
    metrics: dict[str, Series] = {}
    duplicates = 0
    for key, (steps, values) in raw.items():
        if not steps:
            continue
        s = np.asarray(steps, dtype=np.int64)
        v = np.asarray(values, dtype=np.float64)
        order = np.argsort(s, kind="stable")
        s, v = s[order], v[order]
        last = np.append(s[1:] != s[:-1], True)
        if key != EPOCH:  # Lightning adds `epoch` to every log_metrics call, several per step
            duplicates += int((~last).sum())
        metrics[key] = (s[last], v[last])
    return metrics, duplicates
