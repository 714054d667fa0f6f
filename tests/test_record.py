"""The typed run record (experiments/record.py): one schema written by the pipeline and read by every analysis;
a file that is not a record of this version is named with its first wrong field."""

from __future__ import annotations

import json

import pytest

from experiments.record import (
    RECORD_VERSION,
    REQUIRED,
    ExpansionRecord,
    RecordError,
    RunRecord,
    TrainingResult,
    load_records,
    read_finished,
    read_record,
)


def _record(**changes) -> RunRecord:
    values = dict(
        dataset="digits",
        method="cutout",
        seed=1,
        classifier="small_cnn",
        ratio=2,
        config_hash="a" * 16,
        data_fingerprint="b" * 16,
        training=TrainingResult(test_acc_final=90.0, test_acc_best_val=89.5, optimizer_budget={"max_steps": -1}),
        expansion=ExpansionRecord(store="/s", key="k", num_images=20, reused=True),
        original=TrainingResult(test_acc_final=88.0, test_acc_best_val=87.0),
        quality={"fid": 1.5, "feature_extractor": "probe"},
        sizes={"train": 10},
        total_seconds=3.0,
        environment={"cpu_threads": 1},
    )
    return RunRecord(**{**values, **changes})


def test_a_record_round_trips_through_its_file_in_the_flat_layout(tmp_path):
    record = _record()
    path = record.write(tmp_path)
    data = json.loads(path.read_text())
    # the training results stand at the top level, as in every metrics.json so far
    assert data["test_acc_final"] == 90.0 and "training" not in data and data["record_version"] == RECORD_VERSION
    assert data["expansion"]["key"] == "k" and data["original"]["test_acc_final"] == 88.0
    loaded, problem = read_record(tmp_path)
    assert problem is None and loaded == record and loaded.path == path and loaded.folder == tmp_path
    assert loaded.accuracy("test_acc_best_val") == 89.5 and loaded.quality_value("fid") == 1.5
    assert read_finished(tmp_path)[0] == record


def test_a_record_without_a_version_is_version_one_and_unknown_versions_are_refused(tmp_path):
    data = _record().to_json()
    del data["record_version"]
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    assert read_record(tmp_path)[0] == _record()
    (tmp_path / "metrics.json").write_text(json.dumps({**data, "record_version": RECORD_VERSION + 1}))
    assert "record_version" in read_record(tmp_path)[1]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": "1"}, "field seed is '1', not int"),
        ({"seed": True}, "field seed is True, not int"),
        ({"test_acc_final": None}, "field test_acc_final is missing"),
        ({"expansion": {"key": "k"}}, "field expansion.store is missing"),
        ({"original": [1]}, "field original is [1], not an object"),
        ({"sizes": "10"}, "field sizes is '10', not dict"),
        ({"quality": 3}, "field quality is 3, not dict"),
    ],
)
def test_a_wrong_field_is_named(tmp_path, change, named):
    (tmp_path / "metrics.json").write_text(json.dumps({**_record().to_json(), **change}))
    record, problem = read_record(tmp_path)
    assert record is None and named in problem


def test_every_required_field_is_named_when_missing():
    data = _record().to_json()
    for name in REQUIRED:
        with pytest.raises(RecordError, match=f"field {name} is missing"):
            RunRecord.from_json({k: v for k, v in data.items() if k != name})


def test_a_record_without_identity_or_timing_is_not_a_finished_job(tmp_path):
    _record(config_hash=None).write(tmp_path)
    assert read_record(tmp_path)[0] is not None  # a table may still use it
    assert read_finished(tmp_path) == (None, "metrics.json: field config_hash is missing")


def test_load_records_counts_a_copied_job_once_and_names_the_damaged(tmp_path):
    _record().write(tmp_path / "a")
    _record().write(tmp_path / "b")  # the same job copied
    _record(seed=2, config_hash="c" * 16).write(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text('{"dataset": "digits"')
    records, damaged = load_records(tmp_path)
    assert [r.folder.name for r in records] == ["a", "c"]
    assert damaged == [(tmp_path / "d", "metrics.json is unreadable (JSONDecodeError)")]
