"""One identity rule (experiments/training/identity.py), table-driven over every settings dataclass: each field of each
registered method's settings (nested settings included), of the training and classifier settings and of the
engine's generation settings is changed in turn, and the three identities that change are compared with the
rule: a speed-only field changes none; a method setting changes the store key, the training signature and
the config hash; a training or classifier setting the last two. Every exception is listed with its reason."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
from omegaconf import OmegaConf

from expansion.files import content_key
from expansion.settings import is_speed_only
from experiments.config import method_names
from experiments.training.identity import config_identity, store_key, training_signature
from experiments.training.job import Job
from tests.conftest import job_config

ALL = frozenset({"store", "training", "config"})
TRAINING = frozenset({"training", "config"})
CONFIG = frozenset({"config"})
NONE = frozenset()
DATASET = {"name": "digits", "train_fingerprint": "f" * 16}

#: (method or section, field path) -> the identities that change, and why the rule does not apply
EXCEPTIONS: dict[tuple[str, str], tuple[frozenset, str]] = {
    ("classifier", "name"): (CONFIG, "a label: the architecture is `arch`"),
    **{
        (m, "fidelity"): (CONFIG, "a preset: each quirk it sets is keyed on its own")
        for m in ("gif_sd", "sd_img2img", "gif_mae", "gif_unclip", "gif_ae", "gif_ae_unguided", "distdiff")
    },
}
#: the guidance of an unguided GIF changes nothing (the prior samples alone), nor the guide of another kind
UNGUIDED = ("sd_img2img", "gif_ae_unguided")
UNGUIDED_FIELDS = ("guide.", "guidance.", "group_size")


def _exception(owner: str, path: str, expansion) -> tuple[frozenset, str] | None:
    if (owner, path) in EXCEPTIONS:
        return EXCEPTIONS[owner, path]
    if owner in UNGUIDED and path.startswith(UNGUIDED_FIELDS):
        return CONFIG, "unguided: the guide and its criteria are not used"
    guide = getattr(getattr(expansion, "settings", None), "guide", None)
    if guide is not None and path.startswith("guide.") and owner not in UNGUIDED:
        clip = ("arch", "pretrained", "model_config", "template", "logit_scale", "seed_normalization")
        kind_fields = {"probe": ("guide.epochs",), "clip": tuple(f"guide.{k}" for k in (*clip, "sample_normalization"))}
        own = ("guide.kind", *kind_fields.get(guide.kind, ()))
        if not path.startswith(own):
            return CONFIG, f"a setting of another guide kind than {guide.kind}"
    if owner == "real_guidance" and path.startswith(("filter_guide.", "filter_candidates")):
        return CONFIG, "the CLIP filter is off (clip_filter: false): its guide and candidates are not used"
    if owner in ("gif_sd",) and path == "unguided_noise":
        return CONFIG, "guided: the unguided noise rule is not used"
    return None


#: fields whose values are names from a list: another name of the list
CHOICES = {"guide.kind": ("clip", "probe")}


def _changed(value, path=""):
    """Another value of the same type (no validation runs: settings are edited in place)."""
    if path in CHOICES:
        return next(c for c in CHOICES[path] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list | tuple):
        return [*value, "changed"]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return 1 if value is None else "changed"


def _leaves(settings, prefix=""):
    """``(path, field)`` of every non-dataclass field, nested settings by their own fields."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def _edit(settings, path, value):
    """A copy of frozen ``settings`` with ``path`` set to ``value``."""
    head, _, rest = path.partition(".")
    out = copy.copy(settings)
    object.__setattr__(out, head, _edit(getattr(settings, head), rest, value) if rest else value)
    return out


def _get(settings, path):
    for part in path.split("."):
        settings = getattr(settings, part)
    return settings


@functools.cache
def _base(method: str):
    cfg = job_config(["dataset=digits", f"method={method}"])
    return Job.from_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def _identities(job, container, expander=None, train=None, classifier=None):
    expander = expander or job.expander
    store = store_key(DATASET, expander.signature(), 0) if expander is not None else None
    training = training_signature(
        dataset_identity=DATASET,
        store_key=store,
        include_original=True,
        classifier=classifier or job.classifier,
        train=train or job.train,
        seed=0,
    )
    return {"store": store, "training": training, "config": content_key(config_identity(container))}


def _which_changed(before, after):
    return frozenset(k for k in before if before[k] != after[k])


def _set_in(container, section, path, value, settings=None):
    """``container`` with ``<section>.<path>`` set; a nested setting written by a preset name (e.g.
    ``unet: ddpm_cifar10``) is written out as the mapping of ``settings``' value."""
    out = copy.deepcopy(container)
    node = out[section]
    *parents, last = path.split(".")
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            node[part] = dataclasses.asdict(_get(settings, ".".join(parents[: i + 1])))
        node = node[part]
    node[last] = value
    return out


def _expected(owner, path, f, section_default, expansion=None):
    if is_speed_only(f):
        return NONE, "speed-only"
    found = _exception(owner, path, expansion)
    return found if found else (section_default, "the rule")


METHODS = [m for m in method_names() if m != "imported"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_setting_changes_the_identities_the_rule_says(method):
    job, container = _base(method)
    before = _identities(job, container)
    wrong = []
    for path, f in _leaves(job.expander.settings):
        value = _changed(_get(job.expander.settings, path), path)
        expander = copy.copy(job.expander)
        expander.settings = _edit(job.expander.settings, path, value)
        changed = _identities(job, _set_in(container, "method", path, value, job.expander.settings), expander=expander)
        expected, why = _expected(method, path, f, ALL, job.expander)
        if _which_changed(before, changed) != expected:
            wrong.append(f"{path}: {sorted(_which_changed(before, changed))}, expected {sorted(expected)} ({why})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("section", ["train", "classifier"])
def test_every_training_setting_changes_the_training_signature_and_the_config_hash(section):
    job, container = _base("cutout")
    before = _identities(job, container)
    settings = getattr(job, section)
    wrong = []
    for path, f in _leaves(settings):
        value = _changed(_get(settings, path), path)
        edited = _edit(settings, path, value)
        changed = _identities(job, _set_in(container, section, path, value, settings), **{section: edited})
        expected, why = _expected(section, path, f, TRAINING)
        if _which_changed(before, changed) != expected:
            wrong.append(f"{path}: {sorted(_which_changed(before, changed))}, expected {sorted(expected)} ({why})")
    assert not wrong, "\n".join(wrong)


def test_the_engines_batch_size_and_workers_change_no_identity():
    """Per-image seeds: a store made with any ``method.batch_size`` is the same (test_store_engine), so the
    config hash ignores it too (it used to change: a sweep redid a finished job for a faster batch size)."""
    job, container = _base("cutout")
    before = _identities(job, container)
    for key in ("batch_size", "num_workers"):
        assert _which_changed(before, _identities(job, _set_in(container, "method", key, 3))) == NONE, key


def test_run_only_keys_change_no_identity_and_the_seed_changes_the_training():
    job, container = _base("cutout")
    before = _identities(job, container)
    for key in ("progress_bar", "preflight", "store_lock_timeout", "store_verify", "logger", "skip_done"):
        assert _which_changed(before, _identities(job, {**container, key: "x"})) == NONE, key
    assert _which_changed(before, _identities(job, {**container, "seed": 7})) == CONFIG
