"""A misspelt option or setting on the command line: one line with the closest names and the right fix."""

from __future__ import annotations

import pytest

from experiments.overrides import check_overrides
from tests.helpers.cli import run_py


@pytest.mark.parametrize(
    "args, expected",
    [
        (["method=cutot"], "method=cutot: no such method; did you mean cutout?"),
        (["dataset=mnistt"], "dataset=mnistt: no such dataset; did you mean mnist"),
        (["method.ratoi=2"], "method.ratoi: method (method=randaugment) has no setting 'ratoi'; did you mean ratio?"),
        (
            ["trainn.epochs=3"],
            "there is no top-level setting 'trainn'; did you mean train or trainer? (train.epochs=...)",
        ),
        (["train.epoch=3"], "train has no setting 'epoch'; did you mean epochs? (train.epochs=...)"),
        # a sweep: the setting is looked up under every method it names
        (
            ["-m", "method=randaugment,cutout", "method.magnitude=5"],
            "method (method=cutout) has no setting 'magnitude'",
        ),
        (["classifier=small_cnn", "classifier.kwargs.widht=8"], "did you mean width? (classifier.kwargs.width=...)"),
    ],
)
def test_a_misspelt_name_gets_the_closest_names(args, expected):
    problem = check_overrides(args)
    assert problem is not None and expected in problem, problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-m", "method=randaugment", "method.magnitude=5", "train.epochs=3", "hydra.run.dir=/tmp/x"],
        ["+method.ratoi=2"],  # added on purpose: the user's choice
        ["experiment=worth_cpu", "seed=0,1"],
        ["dataset=imagefolder", "dataset.path=/data/x", "method=gif_sd", "method.fidelity=official"],
        ["--config-name=other", "method=anything"],  # another config: not ours to check
        ["method=cutout", "~method.fill"],
    ],
)
def test_valid_command_lines_pass(args):
    assert check_overrides(args) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.ratoi=2"], "error: method.ratoi: method (method=randaugment) has no setting 'ratoi'"),
        (["train.epochs=-1"], "error: train: epochs must be an integer >= 1, got -1"),
        (["threads=0"], "error: threads=0 is not a thread count"),
        (
            ["dataset=imagefolder", "dataset.path=/nonexistent/my_set"],
            "error: dataset 'my_set': expected /nonexistent/my_set but it is missing. Point dataset.path at a folder",
        ),
        (
            ["dataset=npz", "dataset.path=/nonexistent/retina.npz"],
            "error: dataset 'retina': expected /nonexistent/retina.npz but it is missing. Point dataset.path at a .npz",
        ),
    ],
)
def test_a_bad_override_is_one_line_before_torch_is_imported(tmp_path, overrides, message):
    """run.py answers a bad name or value without importing torch (seconds, not the heavy imports), exit 2,
    and leaves no run folder."""
    proc = run_py([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], python=["-X", "importtime"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == [lines[0]] and lines[0].startswith(message), lines
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "lightning" not in imported
    assert not (tmp_path / "run").exists()
