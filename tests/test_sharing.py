"""Sharing an expanded set: the digits default expanded, exported as a Hugging Face dataset, imported and
trained on gives the store's pixels, labels and fields and the same test accuracy; a set made from
another training split is refused, a damaged shard named, the hub upload mocked at the client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from experiments.data import sharing
from experiments.data.sharing import SharingError
from experiments.training.pipeline import run
from tests.conftest import PROJECT_ROOT, job_config
from tests.helpers.tolerances import scores_close

FAST = ["train.epochs=3", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _job(overrides):
    return job_config(overrides + FAST)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The digits default (randaugment x5) run once for the module: its metrics, its store, its folder."""
    root = tmp_path_factory.mktemp("made")
    metrics = run(_job(["dataset=digits", f"paths.cache_dir={root / 'cache'}"]), root / "run")
    return metrics, Path(metrics.expansion.store), root / "run"


@pytest.fixture
def expanded(made, tmp_path):
    """That run's metrics and a copy of its store (a test may damage it); ``tmp_path/made`` is the run."""
    metrics, store, run_dir = made
    shutil.copytree(run_dir, tmp_path / "made")
    copy = tmp_path / "cache" / "stores" / store.name
    shutil.copytree(store, copy)
    return metrics, copy


@pytest.mark.integration
def test_export_import_train_round_trip(tmp_path, expanded):
    metrics, store = expanded
    out = tmp_path / "shared"
    (done,) = sharing.export(tmp_path / "made", out)  # a run folder: its store, with the run's metrics
    assert done.num_images == 1000 and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-4.0\n") and "randaugment" in card
    assert metrics.expansion.key in card
    meta = json.loads((out / sharing.META_FILE).read_text())
    assert meta["store"]["payload"]["dataset"]["train_fingerprint"] in card

    # the Parquet shards hold the image bytes, label, class name and every manifest field
    table = pq.read_table(next((out / "data").glob("*.parquet"))).to_pydict()
    rows = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    assert [json.loads(r) for r in table["manifest_row"]] == rows
    assert table["label"] == [r["label"] for r in rows] and table["class_name"][0] == str(rows[0]["label"])
    assert table["randaugment_ops"] == [r["randaugment_ops"] for r in rows]
    first = np.asarray(Image.open(__import__("io").BytesIO(table["image"][0]["bytes"])))
    assert np.array_equal(first, np.asarray(Image.open(store / "images" / rows[0]["file"])))

    # the datasets library reads it as an image-classification set
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert loaded.features["label"].names == [str(i) for i in range(10)] and len(loaded) == 1000

    # import and train: the same images in the same order, the same accuracy as from the store
    imported = run(_job(["dataset=digits", "method=imported", f"method.path={out}"]), tmp_path / "imported")
    again = run(_job(["dataset=digits"]), tmp_path / "again")  # the store (copied into this test's cache) reused
    assert imported.method == "imported(randaugment)" and imported.ratio == 5
    assert imported.expansion.num_images == 1000 and imported.train_data == "original+generated"
    for key in ("test_acc_final", "test_acc_best_val"):
        assert scores_close(imported.accuracy(key), again.accuracy(key)), (imported.training, again.training)
    with pytest.raises(SharingError, match="no finished expansion store"):  # an imported copy is not exported again
        sharing.export(tmp_path / "imported", tmp_path / "again_shared")
    copy = Path(imported.expansion.store)
    assert [json.loads(line) for line in (copy / "manifest.jsonl").read_text().splitlines()] == rows
    for row in rows:
        assert (copy / "images" / row["file"]).read_bytes() == (store / "images" / row["file"]).read_bytes()


def test_another_training_split_is_refused_with_both_fingerprints(tmp_path, expanded):
    out = tmp_path / "shared"
    sharing.export(expanded[1], out)  # a store folder
    with pytest.raises(SharingError, match=r"expanded from another training set: its source fingerprint is \w+ "):
        run(
            _job(["dataset=digits", "dataset.train_per_class=10", "method=imported", f"method.path={out}"]),
            tmp_path / "r",
        )


def test_a_damaged_shard_is_named(tmp_path, expanded):
    out = tmp_path / "shared"
    sharing.export(expanded[1], out)
    shard = next((out / "data").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SharingError, match=rf"^shard {shard} is missing or damaged"):
        sharing.read_export(out)
    with pytest.raises(SharingError, match="holds no expansion.json"):
        sharing.read_export(tmp_path)


def test_a_damaged_store_is_not_exported(tmp_path, expanded):
    store = expanded[1]
    image = next((store / "images").iterdir())
    image.write_bytes(image.read_bytes()[:-5])
    with pytest.raises(SharingError, match="missing or damaged image"):
        sharing.export(store, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_is_mocked_at_the_client(tmp_path, expanded, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(
                ("upload_folder", kwargs["repo_id"], sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()))
            )

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    sharing.main(["export", str(expanded[1]), str(tmp_path / "out"), "--push-to-hub", "me/digits-randaugment"])
    assert calls[0] == ("create_repo", "me/digits-randaugment", {"repo_type": "dataset", "exist_ok": True})
    assert calls[1] == ("upload_folder", "me/digits-randaugment", ["README.md", "data", "expansion.json"])


def _export_cli(src, out):
    return subprocess.run(
        [sys.executable, "-m", "experiments.data.sharing", "export", str(src), str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_make_export_command(tmp_path, expanded):
    proc = _export_cli(tmp_path / "made", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1000 images in 1 shard(s)" in proc.stdout
    bad = _export_cli(tmp_path / "nothing", tmp_path / "o2")
    assert bad.returncode == 1 and bad.stderr.startswith("error: no finished expansion store")


def test_preflight_names_a_missing_shared_set(tmp_path):
    from experiments.training import preflight

    jobs = [
        _job(["dataset=digits", "method=imported", f"method.path={tmp_path}/nowhere"]),
        _job(["dataset=digits", "method=imported", "method.path=me/not-downloaded"]),
        _job(["dataset=digits", "method=imported", f"method.path={tmp_path}"]),
    ]
    problems = list(preflight.check_jobs(jobs, ["a", "b", "c"]).problems)
    assert any(p.endswith("nowhere: no such folder; give an exported folder or a hub dataset id") for p in problems)
    assert any(
        "'me/not-downloaded' is not in the Hugging Face cache" in p and "--repo-type dataset" in p for p in problems
    )
    assert any(p == f"method.path={tmp_path} holds no expansion.json: not an exported set" for p in problems)
    with pytest.raises(Exception, match="method=imported needs method.path"):
        run(_job(["dataset=digits", "method=imported"]), tmp_path / "r")


def test_an_export_folder_says_what_it_holds(expanded):
    from experiments.data.sharing import export_name

    _, store = expanded
    assert export_name(store) == f"digits_randaugment_x5_{store.name[:8]}"
