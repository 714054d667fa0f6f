"""A run's record, ``metrics.json``: one typed, versioned :class:`RunRecord`, written by the pipeline and read
by :func:`read_record` / :func:`load_records`; nothing else parses the file.

The file is flat JSON (the training results at the top level, ``expansion``, ``quality``, ``original`` and
``environment`` as objects) with ``record_version``; a record without the version is version 1, the first
typed one (the same layout). Only the fields a table needs are required (:data:`REQUIRED`); a sweep counts a
job as finished only when the identity and timing fields are there too (:meth:`RunRecord.unfinished`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD_FILE = "metrics.json"
RECORD_VERSION = 1
#: the accuracies a record carries, each a percentage of the test set
ACCURACIES = ("test_acc_final", "test_acc_best_val", "test_acc_best_test")
#: the final epoch's class-balance-aware scores (MedMNIST reports ACC and AUC): balanced accuracy (the mean of
#: the per-class recalls, percent) and the macro one-vs-rest ROC AUC of the softmax scores (percent)
BALANCED_SCORES = ("test_balanced_acc_final", "test_auc_final")
#: every score a table can be made of
SCORES = ACCURACIES + BALANCED_SCORES


class RecordError(ValueError):
    """A metrics.json that is not a record of this version (the message names the field)."""


@dataclass(frozen=True)
class TrainingResult:
    """One trained classifier: its test accuracies (percent) and how it was trained."""

    test_acc_final: float
    test_acc_best_val: float
    best_val_acc: float | None = None
    best_val_epoch: int | None = None
    test_acc_best_test: float | None = None  # the official scripts' selection on the test set (optimistic)
    test_acc_per_epoch: list[float] | None = None
    test_balanced_acc_final: float | None = None
    test_auc_final: float | None = None
    test_per_class_acc_final: list[float] | None = None  # recall of each class (percent), class-index order
    epochs: int | None = None
    optimizer_steps: int | None = None
    optimizer_budget: dict[str, Any] | None = None
    num_train_images: int | None = None
    train_seconds: float | None = None
    epoch_seconds: list[float] | None = None
    train_loss_per_epoch: list[float | None] | None = None  # the epochs this process trained (after a resume)
    val_acc_per_epoch: list[float] | None = None  # every validation (each optimizer_budget.val_every epochs)
    images_per_second: float | None = None
    resumed_from: dict[str, Any] | None = None

    def accuracy(self, metric: str) -> float | None:
        if metric not in SCORES:
            raise RecordError(f"metric must be one of {SCORES}, got {metric!r}")
        return getattr(self, metric)

    @property
    def step_budget(self) -> bool:
        """Trained to an optimizer-step budget (``train.steps*``) rather than ``train.epochs`` epochs."""
        return int((self.optimizer_budget or {}).get("max_steps", -1)) > 0


@dataclass(frozen=True)
class ExpansionRecord:
    """The expanded set a job trained on: its store and what making it cost."""

    store: str
    key: str
    num_images: int
    generated_images: int = 0
    reused: bool = False
    seconds: float = 0.0
    fit_seconds: float = 0.0
    cpu_seconds: float | None = None
    fit_key: str | None = None  # the cached fit used (methods of one fit signature share it and its cost)


@dataclass(frozen=True)
class RunRecord:
    """What one job did and measured. ``training`` is the classifier trained on the job's data (written flat
    at the top level of the file); ``original`` the same classifier on the original images alone, when the job
    trained that too (``train.compare_original``)."""

    dataset: str
    method: str
    seed: int
    training: TrainingResult
    classifier: str | None = None
    ratio: int = 0
    config_hash: str | None = None  # with data_fingerprint, the job's identity (experiments.training.identity)
    data_fingerprint: str | None = None
    #: the experiment: the config identity less the seed, flattened (experiments.training.identity); runs
    #: with equal settings and data differ only in the seed (one results row)
    settings: dict[str, Any] | None = None
    table: str | None = None
    dataset_source: dict[str, Any] | str | None = None  # how the splits were made (official, a file ...)
    paper_method: str | None = None
    train_data: str = "original"  # original | original+generated | generated only
    train_per_class: int | None = None
    extra_real_per_class: int | None = None
    expansion_seed: int | None = None
    num_classes: int | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    expansion: ExpansionRecord | None = None
    quality: dict[str, Any] | None = None  # the registered quality metrics' values (experiments.quality)
    original: TrainingResult | None = None
    total_seconds: float | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    record_version: int = RECORD_VERSION
    path: Path | None = field(default=None, compare=False)  # the file it was read from

    # ---------------------------------------------------------------- reading

    def accuracy(self, metric: str = "test_acc_final") -> float | None:
        return self.training.accuracy(metric)

    @property
    def folder(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    @property
    def identity(self) -> tuple[str | None, str | None]:
        return self.config_hash, self.data_fingerprint

    @property
    def extra_real(self) -> int:
        return int(self.extra_real_per_class or 0)

    @property
    def generated_only(self) -> bool:
        return self.train_data == "generated only"

    def quality_value(self, key: str) -> float | None:
        """A registered quality metric's value (experiments.quality), None when not measured."""
        value = (self.quality or {}).get(key)
        return None if value is None or isinstance(value, bool) else float(value)

    @property
    def quality_extractor(self) -> str | None:
        return None if self.quality is None else str(self.quality.get("feature_extractor"))

    def unfinished(self) -> str | None:
        """Why this is not a finished job's record (a sweep reruns such a job); None when it is one."""
        for name in FINISHED:
            if getattr(self, name) is None:
                return f"field {name} is missing"
        return None

    def machine(self) -> str:
        env = self.environment
        return f"{env.get('device_name') or env.get('device') or '?'} ({env.get('cpu_threads', '?')} thread(s))"

    # ---------------------------------------------------------------- writing

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "path":
                continue
            value = getattr(self, f.name)
            if f.name == "training":
                out.update(dataclasses.asdict(value))
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            elif value is not None or f.name not in OMITTED_WHEN_NONE:
                out[f.name] = value
        return out

    def write(self, folder: Path | str) -> Path:
        from expansion.files import atomic_write_text

        path = Path(folder) / RECORD_FILE
        atomic_write_text(path, json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> RunRecord:
        """The record of a parsed metrics.json; :class:`RecordError` naming the first wrong field."""
        if not isinstance(data, dict):
            raise RecordError(f"holds {type(data).__name__}, not an object")
        version = data.get("record_version", 1)
        if version != RECORD_VERSION:
            raise RecordError(f"field record_version is {version!r}; this version reads {RECORD_VERSION}")
        return dataclasses.replace(_parse(cls, data, ""), path=path)


#: the fields a sweep needs to call a job finished (beyond the required ones)
FINISHED = ("config_hash", "data_fingerprint", "classifier", "total_seconds")
OMITTED_WHEN_NONE = ("expansion", "quality", "original")
#: the fields every record must carry
REQUIRED = tuple(
    f.name
    for cls in (RunRecord, TrainingResult)
    for f in dataclasses.fields(cls)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "training"
)


def _check(value: Any, kind: Any, name: str) -> Any:
    """``value`` as ``kind`` (an annotation of the record's dataclasses), or RecordError naming ``name``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for option in kinds[:-1]:
            try:
                return _check(value, option, name)
            except RecordError:
                pass
        return _check(value, kinds[-1], name)
    if dataclasses.is_dataclass(kind):
        return _parse(kind, value, f"{name}.")
    base = origin or kind
    ok = isinstance(value, base) and not (isinstance(value, bool) and base in (int, float))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise RecordError(f"field {name} is {value!r:.40}, not {getattr(base, '__name__', base)}")
    return value


def _parse(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RecordError(f"field {prefix.rstrip('.')} is {data!r:.40}, not an object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "path":
            continue
        if f.name == "training" and cls is RunRecord:  # written flat, beside the record's own fields
            own = {g.name for g in dataclasses.fields(RunRecord)}
            values[f.name] = _parse(TrainingResult, {k: v for k, v in data.items() if k not in own}, "")
            continue
        if f.name not in data or (data[f.name] is None and f.name in REQUIRED):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"field {prefix}{f.name} is missing")
            continue
        values[f.name] = _check(data[f.name], hints[f.name], prefix + f.name)
    return cls(**values)


def read_record(job_dir: Path | str) -> tuple[RunRecord | None, str | None]:
    """``(record, None)`` for a folder with a readable record of this version; ``(None, why not)``
    otherwise (``why`` is None when there is no record at all)."""
    path = Path(job_dir) / RECORD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} is unreadable ({type(exc).__name__})"
    try:
        return RunRecord.from_json(data, path), None
    except RecordError as exc:
        return None, f"{path.name}: {exc}"


def read_finished(job_dir: Path | str) -> tuple[RunRecord | None, str | None]:
    """:func:`read_record`, and ``(None, why)`` for a record that is not a finished job's."""
    record, problem = read_record(job_dir)
    if record is not None and (problem := record.unfinished()):
        return None, f"{RECORD_FILE}: {problem}"
    return record, problem


def iter_record_folders(root: Path | str) -> Iterator[Path]:
    """Every folder under ``root`` (itself included) holding a record file, in sorted order."""
    for path in sorted(Path(root).rglob(RECORD_FILE)):
        yield path.parent


def load_records(root: Path | str, *, each_job_once: bool = True) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """``(records, damaged)`` under ``root``: every readable record, each job once (the same config hash
    and data fingerprint found twice, as in a copied job folder, counts once: the first in folder order;
    ``each_job_once=False``: all of them, for a caller that reports the repeats), and ``(folder, what is
    wrong)`` for each unreadable one."""
    records, damaged, seen = [], [], set()
    for folder in iter_record_folders(root):
        record, problem = read_record(folder)
        if record is None:
            damaged.append((folder, problem or "no record"))
            continue
        if each_job_once and record.config_hash is not None:
            if record.identity in seen:
                log.warning(
                    "%s repeats a job already counted (config hash %s): counted once", folder, record.config_hash
                )
                continue
            seen.add(record.identity)
        records.append(record)
    return records, damaged
