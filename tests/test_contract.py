"""The contract of expansion/base.py, tested for every method config in conf/method/ (the registry),
the way diffusers' PipelineTesterMixin and timm's tests over list_models() work: a new method is tested
by being registered. Each method runs on 6 real BreastMNIST images (3 per class) with the cheap
settings its config declares under ``tiny:`` (tiny weights built in code for the methods that load
weights); a method without them runs with its own defaults at ratio 2.

The store signatures of the methods' default configs are pinned in contract_signatures.json: a
change of a method's key (users' caches no longer found) must be deliberate. After such a change, or
to pin a new method, rewrite the file with ``UPDATE_SIGNATURES=1 python -m pytest tests/test_contract.py
-k pinned`` and bump the store's FORMAT_VERSION when the outputs did not change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expansion.architectures import build_mae, save_sd, save_stable_unclip, save_tiny_clip
from expansion.base import ExpansionError
from expansion.files import canonical_json, content_key
from expansion.seeding import image_seeds
from experiments.config import method_names
from experiments.data.datasets import build_dataset
from experiments.training.job import Job, build_expander
from experiments.training.pipeline import run_expansion
from tests.conftest import compose
from tests.helpers.tolerances import same_up_to_float_rounding, scores_close

METHODS = method_names()
SIGNATURES = Path(__file__).with_name("contract_signatures.json")
DATASET = ["dataset=breastmnist", "dataset.train_per_class=3"]


def tiny_overrides(name: str, weights: dict) -> list[str]:
    """The method's own cheap CPU settings (its config's ``tiny:`` block, placeholders such as ``{sd}`` or
    ``{clip.arch}`` naming the tiny weights built here) as overrides, at ratio 2."""
    from omegaconf import OmegaConf

    tiny = compose([f"method={name}", *DATASET]).method.get("tiny")
    flat = _flatten(OmegaConf.to_container(tiny, resolve=False) if tiny is not None else {})
    values = {k: v.format_map(_Weights(weights)) if isinstance(v, str) else v for k, v in flat.items()}
    return ["method.ratio=2", *(f"method.{k}={'null' if v is None else v}" for k, v in values.items())]


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _Weights(dict):
    """The tiny weights by name, for ``str.format_map``; a placeholder naming none is an error that says so."""

    def __missing__(self, key):
        raise KeyError(f"a tiny: placeholder names {key!r}; the contract suite builds {sorted(self)}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_weights")
    build_mae("tiny", seed=1).save_pretrained(root / "mae")
    return {
        "sd": save_sd("tiny", root),
        "ip2p": save_sd("tiny", root, unet_in_channels=8),
        "clip": _Spec(save_tiny_clip(root / "clip")),
        "mae": root / "mae",
        "unclip": save_stable_unclip("tiny", root),
    }


class _Spec(dict):
    """A dict whose keys ``{clip.arch}`` reads as attributes."""

    __getattr__ = dict.__getitem__


@pytest.fixture(scope="module")
def data(shared_data):
    return build_dataset(compose(DATASET).dataset).in_memory()


def _cfg(name: str, weights: dict, root: Path, *extra: str):
    cfg = compose([f"method={name}", *DATASET, *tiny_overrides(name, weights), *extra])
    cfg.paths.store_dir, cfg.paths.fit_dir = str(root / "stores"), str(root.parent / "fits")
    cfg.progress_bar = False
    return cfg


def _pixels(result, row) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(result.store.images_dir / row["file"])))


class InterruptAfter:
    """Wraps an expander's expand: the call after ``batches`` calls raises, like a job killed mid-run."""

    def __init__(self, expander, batches: int):
        self.expand, self.calls, self.batches = expander.expand, 0, batches

    def __call__(self, *args, **kwargs):
        if self.calls == self.batches:
            raise RuntimeError("interrupted (contract test)")
        self.calls += 1
        return self.expand(*args, **kwargs)


@pytest.mark.parametrize("name", METHODS)
def test_expansion_keeps_the_contract(name, weights, data, tmp_path):
    """k uint8 images per seed with the dataset's labels; the same store whatever the batch size; an
    interrupted expansion resumes to it; output (b, j) depends on its seed alone."""
    k, n = 2, len(data.train)
    # batch 6: every seed in one call, uninterrupted
    whole = run_expansion(Job.from_config(_cfg(name, weights, tmp_path / "whole", "method.batch_size=6")), data)
    rows = whole.expanded.rows
    assert [(r["parent"], r["copy"]) for r in rows] == [(p, c) for p in range(n) for c in range(k)]
    assert [r["label"] for r in rows] == [int(data.train.labels[r["parent"]]) for r in rows]
    assert [r["seed"] for r in rows] == image_seeds(0, range(n), k).reshape(-1).tolist()
    first = _pixels(whole, rows[0])
    assert first.dtype == torch.uint8 and first.ndim == 2  # BreastMNIST is grayscale: one channel
    json.dumps(rows)  # manifest fields are JSON scalars or strings

    # batch 2, killed after the first batch, then resumed: the same images and fields
    cfg = _cfg(name, weights, tmp_path / "resumed", "method.batch_size=2")
    expander = build_expander(cfg.method)
    expander.expand = InterruptAfter(expander, batches=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_expansion(Job.from_config(cfg), data, expander)
    expander = build_expander(cfg.method)
    resumed = run_expansion(Job.from_config(cfg), data, expander)
    assert resumed.info["pending_at_start"] == n - 2 and resumed.generated_images == (n - 2) * k
    for a, b in zip(rows, resumed.expanded.rows, strict=True):
        assert set(a) == set(b) and (a["parent"], a["copy"], a["seed"]) == (b["parent"], b["copy"], b["seed"])
        assert same_up_to_float_rounding(_pixels(whole, a), _pixels(resumed, b)), a["file"]
        for key, value in a.items():
            if isinstance(value, float):
                assert scores_close(value, b[key], stored=True), (key, value, b[key])
            elif key != "file":
                assert value == b[key], key

    # the expander (prepared, fitted) maps equal seeds to equal images and other seeds to others
    images, labels = data.train.to_tensor()[:2], torch.as_tensor(data.train.labels[:2])
    seeds = image_seeds(0, range(2), k)
    parents = {"parents": torch.arange(2)} if expander.wants_parents else {}
    with torch.set_grad_enabled(expander.needs_grad):
        out, again = (expander.expand(images, labels, seeds, **parents) for _ in range(2))
        other = expander.expand(images, labels, image_seeds(1, range(2), k), **parents)
    out.validate(2, k)
    assert torch.equal(out.images, again.images)
    assert not torch.equal(out.images, other.images)


@pytest.mark.parametrize("name", METHODS)
def test_bad_settings_are_one_clear_error(name, weights):
    bad = compose([f"method={name}", *DATASET, *tiny_overrides(name, weights), "+method.no_such_setting=1"])
    with pytest.raises(ExpansionError, match=r"^method \w+: unknown setting\(s\) \['no_such_setting'\]; known: "):
        build_expander(bad.method)
    zero = compose([f"method={name}", *DATASET, *tiny_overrides(name, weights), "method.ratio=0"])
    with pytest.raises(ExpansionError, match="ratio must be an integer >= 1"):
        build_expander(zero.method)


def _default_signature(name: str) -> dict:
    return build_expander(compose([f"method={name}", *DATASET]).method).signature()


@pytest.mark.parametrize("name", METHODS)
def test_signature_is_stable_and_leaves_speed_out(name):
    sig = _default_signature(name)
    assert sig == _default_signature(name) and json.loads(canonical_json(sig)) == json.loads(json.dumps(sig))
    assert sig["method"] and sig["ratio"] >= 1
    faster = build_expander(compose([f"method={name}", *DATASET, "method.batch_size=3"]).method).signature()
    assert faster == sig and "batch_size" not in sig


def test_signatures_of_the_default_configs_are_pinned():
    current = {name: content_key(_default_signature(name)) for name in METHODS}
    if os.environ.get("UPDATE_SIGNATURES") == "1":
        SIGNATURES.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    pinned = json.loads(SIGNATURES.read_text())
    changed = sorted(n for n in current if n in pinned and pinned[n] != current[n])
    assert not changed, (
        f"store signatures changed for {changed}: users' caches would no longer be found; if that "
        "is deliberate, rewrite tests/contract_signatures.json (UPDATE_SIGNATURES=1) and bump "
        "expansion.store.FORMAT_VERSION when the outputs did not change"
    )
