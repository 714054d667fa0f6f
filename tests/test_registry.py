"""The registries: methods (conf/method/), datasets (loaders found in any module of experiments/datasets)
and quality metrics, and `make list`, which prints every one of them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from experiments.catalog import entries
from experiments.config import CONFIG_DIR, method_names
from experiments.data import datasets
from tests.conftest import PROJECT_ROOT


def test_make_list_prints_every_registered_method_dataset_and_metric():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.catalog"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = proc.stdout.splitlines()
    catalog = entries()
    assert [n for n, _, _ in catalog["methods"]] == method_names() and "original" not in method_names()
    assert {n for n, _, _ in catalog["datasets"]} == {p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml")}
    for kind, rows in catalog.items():
        assert f"{kind} ({len(rows)}):" in lines
        for name, description, where in rows:
            assert description and description != "(no description)", (kind, name)
            assert any(line.split()[0] == name and f"[{where}]" in line for line in lines if line.startswith("  "))
    assert {"fid_kid", "label_agreement", "diversity", "memorisation"} <= {n for n, _, _ in catalog["quality metrics"]}


def test_a_loader_in_a_new_module_is_registered_without_a_list(tmp_path, monkeypatch):
    (tmp_path / "my_own_set.py").write_text(
        textwrap.dedent('''
        import numpy as np
        import torch

        from experiments.data.datasets import RawSplits, TensorImageSet, register_loader


        @register_loader("my_own_set")
        def load(cfg):
            """Two classes of flat grey squares."""
            images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 8, 8).contiguous()
            labels = np.arange(40) % 2
            return RawSplits(["dark", "light"], TensorImageSet(images, labels), TensorImageSet(images, labels))
    ''')
    )
    datasets.loaders()  # the package's own loaders registered first: the copy below holds them, the original too
    monkeypatch.setattr(datasets, "__path__", [*datasets.__path__, str(tmp_path)])
    monkeypatch.setattr(datasets, "LOADERS", dict(datasets.LOADERS))
    data = datasets.build_dataset({"name": "my_own_set", "image_size": 8})
    assert data.class_names == ["dark", "light"] and len(data.train) + len(data.val) == 40
    assert "my_own_set" in datasets.loaders()


def test_the_catalog_read_from_the_source_is_what_the_registries_hold():
    """`make list` reads the registering decorators without importing torch; this is what importing them
    registers, name for name and function for function."""
    from experiments.catalog import LOADER_SOURCES, METRIC_SOURCES, registered_in_source
    from experiments.quality.metrics import METRICS

    loaders = datasets.loaders()
    assert {(n, w) for n, _, w in registered_in_source(*LOADER_SOURCES)} == {
        (n, f"{fn.__module__}.{fn.__qualname__}") for n, fn in loaders.items()
    }
    assert [(n, w) for n, _, w in registered_in_source(*METRIC_SOURCES)] == [
        (m.name, f"{m.fn.__module__}.{m.fn.__qualname__}") for m in METRICS.values()
    ]
