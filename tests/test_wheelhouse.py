"""The offline bundle for a GPU node (experiments/tools/wheelhouse.py) and the quick GPU command
(experiments/tools/gpu_quick.py): the bundle for the node's Python 3.12 is built and sized, and the same
bundle for this interpreter, installed into an empty folder on a clean Python that sees only the
node image's packages, imports the project and runs ``gpu_quick.py --device cpu --smoke`` end to end.
Needs the package index (as ``make install`` does)."""

from __future__ import annotations

import json
import sys

import pytest

from experiments.tools import gpu_quick, wheelhouse


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("wheelhouse")
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    node = wheelhouse.build(root / "py312", "3.12", wheelhouse.DEFAULT_PLATFORMS, shared_data)
    here = (
        node if local == "3.12" else wheelhouse.build(root / "here", local, wheelhouse.DEFAULT_PLATFORMS, shared_data)
    )
    return root, node, here


@pytest.mark.integration
def test_the_bundle_for_the_node_holds_what_it_lacks_and_fits_the_slot(bundles):
    root, node, _ = bundles
    assert node["size_mb"] < wheelhouse.SIZE_LIMIT_MB
    names = {f.split("-")[0].lower().replace("_", "-") for f in node["files"] if f.endswith(".whl")}
    # the project, the packages the image lacks (antlr4: a source archive, built here as a pure wheel) ...
    assert {"dataset-expansion", "diffusers", "open-clip-torch", "hydra-core", "omegaconf"} <= names
    assert "antlr4-python3-runtime" in names and "data/medmnist/breastmnist.npz" in node["files"]
    # ... and nothing the image has, nor an optional package
    assert not names & {"torch", "torchvision", "transformers", "timm", "lightning", "numpy", "pillow"}
    assert not names & set(wheelhouse.OPTIONAL)
    assert json.loads((root / "py312" / "MANIFEST.json").read_text())["python_version"] == "3.12"
    for wheel in (root / "py312").glob("*.whl"):
        assert wheelhouse._supported(wheel, "3.12", wheelhouse.DEFAULT_PLATFORMS), wheel.name


@pytest.mark.integration
def test_installed_on_a_clean_python_the_bundle_runs_the_quick_command_smoke(bundles, shared_data, tmp_path):
    root, _, _ = bundles
    bundle = root / "here" if (root / "here").is_dir() else root / "py312"
    done = wheelhouse.check(bundle, tmp_path, shared_data)
    assert done.returncode == 0
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert summary["mode"] == "smoke"
    assert [p["part"] for p in summary["parts"]] == [p.name for p in gpu_quick.parts(shared_data, False, tmp_path)]
    assert all(p["status"] == "ok" and p["summary"] for p in summary["parts"]), summary["parts"]
    for name in ("gif_sd", "closed_set", "gif_mae", "gif_unclip"):
        assert json.loads((tmp_path / "smoke" / f"{name}.json").read_text())["results"]
    assert json.loads((tmp_path / "smoke" / "training.json").read_text())["ratio_framework_over_bare"] > 0


def test_the_quick_command_refuses_what_it_cannot_measure(shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_quick.main(["--out", str(tmp_path), "--device", "cpu"])  # a CPU without --smoke measures nothing
    assert "--smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_quick.main(["--out", str(tmp_path), "--device", "cpu", "--smoke", "--data", str(tmp_path)])
    assert "breastmnist.npz not found" in capsys.readouterr().err


@pytest.mark.integration
def test_a_part_over_its_cap_is_killed_and_the_others_still_run(shared_data, tmp_path, monkeypatch):
    slow = gpu_quick.Part("slow", 2, [], ["-c", "import time; time.sleep(60)"], str, json_output=False)
    fast = gpu_quick.Part("fast", 30, [], ["-c", "print('done')"], lambda r: r["tail"], json_output=False)
    monkeypatch.setattr(gpu_quick, "parts", lambda data, compile_unet, out: [slow, fast])
    assert gpu_quick.main(["--out", str(tmp_path), "--device", "cpu", "--smoke", "--data", str(shared_data)]) == 1
    parts = {p["part"]: p for p in json.loads((tmp_path / "summary.json").read_text())["parts"]}
    assert parts["slow"]["status"].startswith("timed out") and parts["slow"]["seconds"] < 30
    assert parts["fast"]["status"] == "ok" and parts["fast"]["summary"] == "done"
