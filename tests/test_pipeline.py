"""End to end: run.py on the offline default, a multirun into results.md, clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from expansion.base import ExpansionError
from experiments.data.datasets import DatasetError, DatasetNotFoundError
from experiments.record import read_record
from experiments.training.pipeline import run
from tests.conftest import PROJECT_ROOT, job_config
from tests.helpers.cli import run_py


def _cfg(overrides):
    return job_config(overrides)


@pytest.mark.integration
def test_pipeline_end_to_end_original_vs_expanded(tmp_path, capsys):
    cfg = _cfg(
        [
            "dataset=digits",
            "method=cutout",
            "method.ratio=2",
            "train.epochs=2",
            "train.compare_original=true",
            "logger=csv",
        ]
    )
    metrics = run(cfg, tmp_path / "run")
    saved, problem = read_record(tmp_path / "run")
    assert problem is None and saved == metrics and saved.to_json() == metrics.to_json()
    assert metrics.dataset == "digits" and metrics.method == "cutout" and metrics.ratio == 2
    assert metrics.training.num_train_images == 3 * metrics.sizes["train"]
    assert metrics.expansion.num_images == 2 * metrics.sizes["train"]
    assert metrics.original.num_train_images == metrics.sizes["train"]
    for m in (metrics.training, metrics.original):
        assert 0 <= m.test_acc_final <= 100 and 0 <= m.test_acc_best_val <= 100
        assert 0 <= m.best_val_epoch < 2
    out = capsys.readouterr().out
    assert "test acc: final" in out and "original (no expansion)" in out
    assert list((tmp_path / "run" / "logs").rglob("metrics.csv"))
    # the same expansion is reused by a second run
    again = run(cfg, tmp_path / "run2")
    assert again.expansion.reused and again.expansion.generated_images == 0
    assert again.expansion.key == metrics.expansion.key


def test_generated_only_and_extra_real_training_sets(tmp_path, capsys):
    cfg = _cfg(
        [
            "dataset=digits",
            "dataset.train_per_class=10",
            "method=cutout",
            "method.ratio=2",
            "train.epochs=1",
            "train.include_original=false",
            "train.compare_original=false",
        ]
    )
    metrics = run(cfg, tmp_path / "gen")
    assert metrics.train_data == "generated only" and metrics.training.num_train_images == 2 * 100
    assert "(generated only)" in capsys.readouterr().out
    extra = run(
        _cfg(
            [
                "dataset=digits",
                "dataset.train_per_class=10",
                "dataset.extra_real_per_class=5",
                "method=original",
                "train.epochs=1",
            ]
        ),
        tmp_path / "extra",
    )
    assert extra.training.num_train_images == 150 and extra.sizes["extra_real"] == 50
    with pytest.raises(ExpansionError, match="method=original generates none"):
        run(_cfg(["dataset=digits", "method=original", "train.include_original=false"]), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_original_expands_nothing(tmp_path):
    import torch

    before = torch.get_num_threads()
    threads = 2 if before != 2 else 1
    metrics = run(_cfg(["dataset=digits", "method=original", "train.epochs=1", f"threads={threads}"]), tmp_path)
    assert metrics.ratio == 0 and metrics.expansion is None and metrics.original is None
    assert metrics.training.num_train_images == metrics.sizes["train"]
    # the job ran on its own thread count (recorded, and part of its experiment), the caller's is restored
    assert metrics.environment["cpu_threads"] == threads and metrics.settings["threads"] == threads
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "overrides,error,pattern",
    [
        (["method=cutout", "method.ratio=0"], ExpansionError, "ratio must be an integer >= 1"),
        (["method=gridmask", "method.ratio=2.5"], ExpansionError, "ratio must be an integer >= 1"),
        (
            ["method=cutout", "+method.hole_count=3"],
            ExpansionError,
            r"method cutout: unknown setting\(s\) \['hole_count'\]",
        ),
        (["dataset.train_per_class=500"], DatasetError, "train_per_class=500 but class 0"),
        (["dataset=breastmnist", "dataset.root=/nonexistent/medmnist"], DatasetNotFoundError, "breastmnist.npz"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        run(_cfg(overrides + ["train.epochs=1"]), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not list((tmp_path / "cache").rglob("*.png")) if (tmp_path / "cache").exists() else True


def _run_py(*args, timeout=600):
    return run_py(args, timeout=timeout)


def test_a_run_logged_to_a_file_talks(tmp_path):
    """Output sent to a file (no terminal, PROGRESS_BAR unset): no progress bar, but a line per generation
    batch and per training epoch with its ETA, and a last line with the time of every phase."""
    env = {k: v for k, v in os.environ.items() if k != "PROGRESS_BAR"}
    env |= {"HYDRA_FULL_ERROR": "0", "EXPANSION_CACHE": str(tmp_path / "cache")}
    log_file = tmp_path / "job.log"
    args = ["dataset=digits", "method=cutout", "method.ratio=2", "method.batch_size=100", "train.epochs=3"]
    args += ["quality.epochs=2", "progress_every_s=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    with log_file.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "run.py", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"generation: 200/400 images \(50%\), [\d,.]+ images/s, .*, ETA ", text), text[-3000:]
    assert "generation: 400/400 images (100%)" in text
    for epoch in (1, 2):
        assert re.search(rf"training epoch {epoch}/3: train loss [\d.]+, val acc [\d.]+%, [\d.]+ s, ETA [\d.]+ s", text)
    assert re.search(r"training epoch 3/3: .*, last epoch", text)
    assert re.search(r"training \(original\) epoch 3/3: ", text)
    assert re.search(
        r"done in [\d.]+ s: expansion [\d.]+ s, quality [\d.]+ s, training [\d.]+ s, training \(original\) [\d.]+ s",
        text,
    )
    assert "━" not in text and "it/s" not in text  # no progress bar in a file
    assert (tmp_path / "run" / "learning_curve.png").is_file()


@pytest.mark.integration
def test_multirun_over_methods_produces_results_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run_py(
        "-m",
        "dataset=digits",
        "method=original,cutout,gridmask,randaugment",
        "train.epochs=2",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = (sweep / "results.md").read_text()
    table = results.split("**test accuracy at the best")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == ["original", "cutout", "gridmask", "randaugment"]
    assert len((sweep / "results.csv").read_text().splitlines()) == 5
    assert len(list(sweep.rglob("metrics.json"))) == 4


@pytest.mark.integration
def test_cli_errors_are_one_clear_line(tmp_path):
    proc = _run_py("method=cutout", "method.ratio=0", f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode == 2
    assert "error: cutout: expansion ratio must be an integer >= 1 (new images per seed), got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run_py("dataset=nope", f"hydra.run.dir={tmp_path}/r2")
    assert proc.returncode == 2 and "error: dataset=nope: no such dataset; the choices: " in proc.stderr
    assert "breastmnist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad", [["train/a/2.png"], ["train/a/2.png", "train/b/0.png", "test/b/3.png"]])
def test_every_unreadable_image_is_named_in_one_run(tmp_path, bad):
    """One bad file: its one line; three in two splits: one run names all three (not one per run). Nothing
    is generated or recorded."""
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (12, 12), (i * 50, 10, 10)).save(tmp_path / "data" / split / c / f"{i}.png")
    for name in bad:
        (tmp_path / "data" / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = _cfg(
        [
            "dataset=imagefolder",
            f"dataset.path={tmp_path / 'data'}",
            "dataset.image_size=12",
            "dataset.val_fraction=0.25",
            "method=cutout",
            "method.ratio=1",
            "train.epochs=1",
        ]
    )
    with pytest.raises(DatasetError) as error:
        run(cfg, tmp_path / "run")
    message = str(error.value)
    if len(bad) == 1:
        assert re.fullmatch(rf"unreadable image {tmp_path / 'data' / bad[0]}: .*", message), message
    else:
        assert message.startswith(f"{len(bad)} images cannot be used:")
    assert all(f"unreadable image {tmp_path / 'data' / name}" in message for name in bad), message
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not list((tmp_path / "cache").rglob("manifest.jsonl"))


def _readme_example(section: str, monkeypatch, namespace: dict | None = None):
    """The first python block of a README section, run as a module (dataclasses resolve annotations
    through it); returns the module."""
    import re
    import types

    readme = (PROJECT_ROOT / "README.md").read_text()
    code = re.search(rf"## {section}.*?```python\n(.*?)```", readme, re.S).group(1)
    module = types.ModuleType("readme_example")
    module.__dict__.update(namespace or {})
    module.code_lines = len(code.splitlines())
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(code, module.__dict__)
    return module


def test_readme_method_example_is_a_working_expander(monkeypatch):
    """The 'Adding a method' example in README.md runs and satisfies the contract."""
    import torch

    module = _readme_example("Adding a method", monkeypatch)
    expander = module.MyMethod(ratio=3)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = expander.expand(images, torch.tensor([0, 1]), torch.arange(6).reshape(2, 3))
    out.validate(2, 3)
    assert "batch_size" not in expander.signature() and expander.signature()["strength"] == 0.5


def test_readme_gif_prior_example_is_a_working_gif(monkeypatch, shared_data):
    """The 'Adding a GIF prior' example in README.md (well under 120 lines) runs GIF's guided steps on
    real images with a probe guide, and its unguided ablation uses the same draws."""
    import numpy as np
    import torch

    from expansion.base import ExpansionContext
    from expansion.gif.guides import ProbeGuide
    from expansion.probe import train_probe
    from expansion.seeding import image_seeds

    module = _readme_example("Adding a GIF prior", monkeypatch)
    assert module.code_lines < 120
    z = np.load(shared_data / "medmnist" / "breastmnist.npz")
    images = torch.from_numpy(z["train_images"][:8])[:, None]
    labels = torch.from_numpy(z["train_labels"][:8, 0].astype(np.int64))
    guide = ProbeGuide(train_probe(images, labels, 2, epochs=1, min_steps=5))
    outputs = {}
    for guided in (True, False):
        exp = module.GifPixels(ratio=3, guided=guided, guide={"kind": "probe"}, radius=5.0)
        exp.context = ExpansionContext("breastmnist", ["malignant", "normal, benign"], channels=1)
        exp.use_guide(guide)
        outputs[guided] = exp.expand(images, labels, image_seeds(0, range(8), 3))
        outputs[guided].validate(8, 3)
    rows = outputs[True].field_rows()
    assert outputs[True].images.shape == (8, 3, 1, 32, 32)
    after, before = np.mean([r["score_after"] for r in rows]), np.mean([r["score_before"] for r in rows])
    assert after > before, (after, before)
    assert [r["radius_abs"] for r in rows] == [r["radius_abs"] for r in outputs[False].field_rows()]
    assert not torch.equal(outputs[True].images, outputs[False].images)


def test_readme_metric_example_reaches_the_quality_metrics(monkeypatch):
    """The 'Adding a metric' example in README.md registers and runs with the other metrics."""
    import torch

    from experiments import quality

    monkeypatch.setattr(quality.metrics, "METRICS", dict(quality.metrics.METRICS))
    _readme_example(
        "Adding a metric",
        monkeypatch,
        {name: getattr(quality, name) for name in ("register_metric", "Column", "QualityInputs")},
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 200, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 2
    metrics = quality.quality_metrics(images, labels, images + 20, labels, 2, epochs=1)
    assert abs(metrics["brightness_gap"] - 20.0) < 1e-3


@pytest.mark.integration
def test_test_every_epoch_reports_the_papers_selection_without_changing_training(tmp_path, capsys):
    """``train.test_every_epoch``: the official scripts' selection (best test epoch) beside ours; the
    training itself (shuffling, augmentation, weights) is the same as without it."""
    base = ["dataset=digits", "method=cutout", "method.ratio=1", "train.epochs=3", "quality.enabled=false"]
    plain = run(_cfg(base), tmp_path / "plain")
    tested = run(_cfg([*base, "train.test_every_epoch=true"]), tmp_path / "tested")
    assert plain.training.test_acc_best_test is None and plain.training.test_acc_per_epoch is None
    assert tested.training.test_acc_final == plain.training.test_acc_final
    assert tested.training.test_acc_best_val == plain.training.test_acc_best_val
    per_epoch = tested.training.test_acc_per_epoch
    assert len(per_epoch) == 3
    assert per_epoch[-1] == pytest.approx(tested.training.test_acc_final, abs=1e-3)
    assert per_epoch[tested.training.best_val_epoch] == pytest.approx(tested.training.test_acc_best_val, abs=1e-3)
    assert tested.training.test_acc_best_test == pytest.approx(max(per_epoch), abs=1e-3)
    assert "best test epoch" in capsys.readouterr().out
    # a run whose best val epoch is not the last (no learning: val accuracy ties, the first epoch is kept)
    # still reports every epoch (testing the best checkpoint restores the histories up to its epoch)
    frozen = run(_cfg([*base, "train.test_every_epoch=true", "train.lr=1e-9"]), tmp_path / "frozen")
    assert len(frozen.training.test_acc_per_epoch) == 3
    assert frozen.training.test_acc_per_epoch[frozen.training.best_val_epoch] == pytest.approx(
        frozen.training.test_acc_best_val, abs=1e-3
    )
