"""The classifier module and the batched training augmentation."""

from __future__ import annotations

import itertools
import math

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.data import augment
from experiments.data.datamodule import ExpansionDataModule
from experiments.data.datasets import build_dataset
from experiments.training.classifier import ImageClassifier, SmallConvNet, create_network
from tests.conftest import compose


@pytest.mark.parametrize("size", [8, 28, 32])
def test_small_cnn_shapes(size):
    net = SmallConvNet(num_classes=7, in_chans=1, input_size=size)
    assert net(torch.zeros(2, 1, size, size)).shape == (2, 7)


@pytest.mark.parametrize(
    "arch", ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenetv2_100", "torchvision.resnet18"]
)
def test_paper_architectures_build_from_scratch_for_gray_input(arch):
    net = create_network(arch, num_classes=3, in_chans=1, input_size=64)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 3)


def test_unknown_arch_is_clear():
    with pytest.raises(ValueError, match="unknown classifier arch 'resnet5O'"):
        create_network("resnet5O", 3, 3, 32)


def test_cosine_schedule_is_one_schedule_from_lr_to_zero():
    model = ImageClassifier("small_cnn", 2, 1, 8, lr=0.1, epochs=10)
    opt = model.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(opt["optimizer"].param_groups[0]["lr"])
        opt["optimizer"].step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a > b for a, b in itertools.pairwise(lrs))
    group = opt["optimizer"].param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4


def _quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer without logs, checkpoints, progress bar or sanity checks."""
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(accelerator="cpu", num_sanity_val_steps=0, **quiet, **kwargs)


def test_training_on_real_digits_learns():
    data = build_dataset(compose(["dataset=digits"]).dataset)
    dm = ExpansionDataModule(data, None, None, recipe="digits", input_size=8, batch_size=32)
    model = ImageClassifier("small_cnn", 10, 1, 8, lr=0.05, epochs=8)
    trainer = _quiet_trainer(max_epochs=8)
    before = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    trainer.fit(model, datamodule=dm)
    after = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert after > 0.7 and after > before + 0.3
    assert len(model.val_history) == 8


@pytest.mark.parametrize("recipe", augment.RECIPES)
def test_every_recipe_produces_normalised_batches(recipe):
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    out = augment.augment_batch(augment.shrink_to(images, augment.base_size(recipe, 32)), recipe, 32)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    ev = augment.normalize(augment.prepare_eval(images, recipe, 32))
    assert ev.shape == (5, 3, 32, 32)


def test_identity_params_reproduce_the_image(monkeypatch):
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    monkeypatch.setattr(torch, "rand", lambda n, device=None: torch.full((n,), 0.5))  # angle 0, no flip
    out = augment.augment_batch(images, "medical", 16)
    assert torch.allclose(out, augment.normalize(images), atol=1e-4)


def test_flip_and_rotation_match_torchvision():
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8).float()
    theta = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
    flipped = torch.nn.functional.grid_sample(images, grid, align_corners=False)
    assert torch.allclose(flipped, TF.horizontal_flip(images), atol=1e-4)
    # a 90 degree rotation is exact on the pixel grid; compare with torchvision's rotate
    rot = augment._rotation(torch.tensor([90.0]))
    theta = torch.cat([rot, torch.zeros(1, 2, 1)], 2)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 16, 16], align_corners=False)
    ours = torch.nn.functional.grid_sample(images, grid, align_corners=False)
    assert torch.allclose(ours, TF.rotate(images, 90.0), atol=1e-3)


def test_random_crop_shifts_stay_within_padding():
    torch.manual_seed(0)
    theta = augment.affine_params("cifar", 500, 32, 32, "cpu")
    shifts = theta[:, :, 2] * 16  # in pixels (rotation mixes the components; bound by the norm)
    assert shifts.norm(dim=1).max() <= 4 * math.sqrt(2) + 1e-4
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 1, 1]))
    assert angles.abs().max() <= 15.0 + 1e-3 and angles.abs().max() > 10


def test_datamodule_concatenates_expanded_images(shared_data):
    data = build_dataset(OmegaConf.merge(compose(["dataset=breastmnist"]).dataset, {"train_per_class": 5}))
    extra = torch.zeros(7, 1, 28, 28, dtype=torch.uint8)
    dm = ExpansionDataModule(data, extra, [1] * 7, recipe="medical", input_size=28, batch_size=4)
    assert dm.num_train == 17
    assert dm.train_set.labels[-7:].tolist() == [1] * 7


class _AlwaysClassZero(torch.nn.Module):
    """A collapsed classifier: every image gets the same scores, class 0 first."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.arange(num_classes, 0, -1, dtype=torch.float32))

    def forward(self, x):
        return self.scores.expand(x.shape[0], -1)


def _tested(model, dm) -> float:
    return _quiet_trainer().test(model, datamodule=dm, verbose=False)[0]["test/acc"]


def test_balanced_accuracy_and_auc_see_a_collapsed_classifier():
    """MedMNIST's pair: a classifier that always answers one class keeps that class's share as accuracy,
    but its balanced accuracy is 1 / K and its AUC 50 %; a trained one's scores agree with scikit-learn's."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    data = build_dataset(compose(["dataset=digits"]).dataset)
    dm = ExpansionDataModule(data, None, None, recipe="digits", input_size=8, batch_size=32)
    model = ImageClassifier("small_cnn", 10, 1, 8, lr=0.05, epochs=3)
    model.net = _AlwaysClassZero(10)
    accuracy = _tested(model, dm)
    labels = np.asarray(data.test.labels)
    assert accuracy == pytest.approx(float(np.mean(labels == 0)), abs=1e-6)
    assert model.test_scores["balanced_acc"] == pytest.approx(10.0, abs=1e-4)
    assert model.test_scores["per_class_acc"] == [100.0] + [0.0] * 9
    assert model.test_scores["auc"] == pytest.approx(50.0, abs=1e-4)

    trained = ImageClassifier("small_cnn", 10, 1, 8, lr=0.05, epochs=3)
    _quiet_trainer(max_epochs=3).fit(trained, datamodule=dm)
    _tested(trained, dm)
    trained.eval()
    with torch.no_grad():
        batches = [(trained(x), y) for x, y in (dm.on_after_batch_transfer(b, 0) for b in dm.test_dataloader())]
    scores = torch.cat([s for s, _ in batches]).softmax(-1).numpy()
    truth = torch.cat([y for _, y in batches]).numpy()
    assert trained.test_scores["balanced_acc"] == pytest.approx(
        100 * balanced_accuracy_score(truth, scores.argmax(1)), abs=1e-3
    )
    assert trained.test_scores["auc"] == pytest.approx(100 * roc_auc_score(truth, scores, multi_class="ovr"), abs=1e-3)
    assert trained.test_scores["balanced_acc"] == pytest.approx(np.mean(trained.test_scores["per_class_acc"]), abs=1e-3)


def test_online_augmentation_draws_fresh_repeatable_images():
    from experiments.data.datamodule import online_augment_batch
    from experiments.training.pipeline import online_augmenter

    assert online_augmenter("none") is None
    expander = online_augmenter("randaugment")
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    labels = torch.arange(6)
    torch.manual_seed(3)
    first, second = online_augment_batch(expander, images, labels), online_augment_batch(expander, images, labels)
    torch.manual_seed(3)
    again = online_augment_batch(expander, images, labels)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, second) and not torch.equal(first, images)


def test_online_augment_is_checked_and_keeps_earlier_hashes():
    from experiments.training.identity import config_identity
    from experiments.training.settings import ONLINE_AUGMENTS, TrainSettings

    base = dict(epochs=2, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0.0, warmup_epochs=0)
    base |= dict(label_smoothing=0.0, include_original=True, eval_batch_size=8, num_workers=0, compile=False)
    base |= dict(compare_original=False, test_every_epoch=False)
    assert ONLINE_AUGMENTS == ("randaugment", "cutout", "gridmask")
    with pytest.raises(Exception, match="online_augment"):
        TrainSettings(**base, online_augment="autoaugment")
    # a job from before the setting (no key) and the same job with online_augment: none hash alike
    before = {"train": dict(base), "seed": 0}
    now = {"train": {**base, "online_augment": "none"}, "seed": 0}
    assert config_identity(now) == config_identity(before)
    assert config_identity({"train": {**base, "online_augment": "cutout"}, "seed": 0}) != config_identity(before)


# --------------------------------------------------------------------------- how generated images enter training


def _marked_expansion(data, per_image: int = 2, shift_labels: bool = False):
    """``per_image`` generated images per real image, each a constant image whose value names it (1 + its index),
    so a batch tells which generated image it holds; labels are the parent's (or the next class)."""
    n = len(data.train)
    parents = np.repeat(np.arange(n), per_image)
    images = torch.arange(1, len(parents) + 1, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).clone()
    labels = np.asarray(data.train.labels)[parents]
    return images, (labels + 1) % 10 if shift_labels else labels, parents


def _generated_index(image: torch.Tensor) -> int | None:
    """The generated image a training image is (its constant value - 1), None for a real image."""
    return int(image.max()) - 1 if int(image.min()) == int(image.max()) > 0 else None


def _epochs(dm, epochs: int, seed: int = 0):
    """What the classifier saw over ``epochs`` seeded epochs: (position, image, label) of every draw, in order."""
    torch.manual_seed(seed)
    seen = []
    for _ in range(epochs):
        images, labels = dm.train_set.__getitems__(list(range(len(dm.train_set))))
        seen += list(zip(range(len(labels)), images, labels.tolist()))
    return seen


def _modes_datamodule(mode: str, p: float = 0.5, shift_labels: bool = False):
    from experiments.training.settings import SyntheticSettings

    data = build_dataset(compose(["dataset=digits", "dataset.train_per_class=5"]).dataset)
    images, labels, parents = _marked_expansion(data, shift_labels=shift_labels)
    dm = ExpansionDataModule(
        data,
        images,
        labels,
        recipe="digits",
        input_size=8,
        batch_size=10,
        synthetic=SyntheticSettings(mode=mode, p=p),
        expanded_parents=parents,
    )
    return data, dm, parents


def test_concatenation_shows_every_real_and_generated_image_once_per_epoch():
    data, dm, parents = _modes_datamodule("concat")
    assert dm.num_train == 3 * len(data.train)
    torch.manual_seed(0)
    seen = [_generated_index(img) for images, _ in dm.train_dataloader() for img in images]
    assert sorted(i for i in seen if i is not None) == list(range(len(parents)))
    assert sum(i is None for i in seen) == len(data.train)


def test_local_replacement_swaps_a_real_image_for_one_of_its_own_expansions():
    data, dm, parents = _modes_datamodule("local_replacement", p=0.5)
    assert dm.num_train == len(data.train)  # an epoch is one pass over the real images: the original's steps
    seen = _epochs(dm, 20)
    real_labels = np.asarray(data.train.labels)
    replaced = [(i, _generated_index(img), y) for i, img, y in seen if _generated_index(img) is not None]
    assert 440 <= len(replaced) <= 560  # p = 0.5 of 1,000 draws (3 binomial sds)
    assert all(parents[j] == i and y == real_labels[i] for i, j, y in replaced)  # its own, with its label
    assert {j for _, j, _ in replaced} == set(range(len(parents)))  # both expansions of every image drawn
    first, again = _epochs(dm, 1, seed=5), _epochs(dm, 1, seed=5)
    assert all(torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(first, again))  # repeatable per seed
    assert not any(
        _generated_index(img) is not None for _, img, _ in _epochs(_modes_datamodule("local_replacement", p=0.0)[1], 3)
    )


def test_global_replacement_draws_any_generated_image_with_its_label():
    data, dm, parents = _modes_datamodule("global_replacement", p=0.5, shift_labels=True)
    seen = _epochs(dm, 20)
    real_labels = np.asarray(data.train.labels)
    replaced = [(i, _generated_index(img), y) for i, img, y in seen if _generated_index(img) is not None]
    assert 440 <= len(replaced) <= 560
    assert all(y == (real_labels[parents[j]] + 1) % 10 for _, j, y in replaced)  # the generated image's label
    assert sum(parents[j] != i for i, j, _ in replaced) > 0.9 * len(replaced)  # from the whole pool
    real = [(i, y) for i, img, y in seen if _generated_index(img) is None]
    assert all(y == real_labels[i] for i, y in real)
    everything = _epochs(_modes_datamodule("global_replacement", p=1.0)[1], 1)
    assert all(_generated_index(img) is not None for _, img, _ in everything)


@pytest.mark.parametrize("mode", ["concat", "local_replacement", "global_replacement"])
def test_a_step_budget_is_exact_in_every_synthetic_mode(tmp_path, mode):
    from experiments.training.pipeline import run
    from tests.conftest import job_config

    cfg = job_config(
        ["dataset=digits", "method=cutout", "method.ratio=2", "train.epochs=2", "train.steps=20"]
        + ["quality.enabled=false", "train.compare_original=false", f"train.synthetic.mode={mode}"]
    )
    record = run(cfg, tmp_path / "run")
    assert record.training.optimizer_steps == 20
    expected = 3 * record.sizes["train"] if mode == "concat" else record.sizes["train"]
    assert record.training.num_train_images == expected


def test_synthetic_modes_are_checked_and_keep_earlier_hashes():
    from experiments.training.identity import config_identity
    from experiments.training.settings import SyntheticSettings

    with pytest.raises(Exception, match="mode"):
        SyntheticSettings(mode="replace_all")
    with pytest.raises(Exception, match="p"):
        SyntheticSettings(mode="local_replacement", p=1.5)
    before = {"train": {"epochs": 2}, "seed": 0}
    default = {"train": {"epochs": 2, "synthetic": {"mode": "concat", "p": 0.5, "soft_labels": False}}, "seed": 0}
    local = {"train": {"epochs": 2, "synthetic": {"mode": "local_replacement", "p": 0.5}}, "seed": 0}
    assert config_identity(default) == config_identity(before) != config_identity(local)


def test_a_budget_that_ends_inside_the_first_epoch_still_validates_once(tmp_path):
    """7 steps of a 9-step epoch: Lightning stops mid-epoch before any validation; the final weights are
    validated once and are the best-val candidate (this crashed with 'found no path for the best weights')."""
    from experiments.training.pipeline import run
    from tests.conftest import job_config

    cfg = job_config(
        ["dataset=digits", "method=cutout", "method.ratio=2", "train.epochs=2", "train.steps=7"]
        + ["quality.enabled=false", "train.compare_original=false"]
    )
    t = run(cfg, tmp_path / "run").training
    assert t.optimizer_steps == 7 and len(t.val_acc_per_epoch) == 1
    assert t.test_acc_best_val == t.test_acc_final and t.best_val_epoch == t.epochs - 1


def test_soft_labels_are_built_additively_and_checked(tmp_path):
    from expansion.store import ExpandedSet, ExpansionError

    rows = [
        {"label": 0, "parent": 0, "soft_target": 2, "soft_weight": 0.3},
        {"label": 1, "parent": 1, "soft_target": 1, "soft_weight": 0.4},  # a same-class draw: 1.0, as Diff-Mix's code
    ]
    dense = ExpandedSet(tmp_path, rows).soft_labels(3)
    np.testing.assert_allclose(dense, [[0.7, 0.0, 0.3], [0.0, 1.0, 0.0]], atol=1e-7)
    for bad, match in (
        ({"soft_weight": 1.5}, "soft_weight"),
        ({"soft_target": 3}, "soft_target"),
        ({"soft_target": "dog"}, "not a number"),
    ):
        with pytest.raises(ExpansionError, match=match):
            ExpandedSet(tmp_path, [{**rows[0], **bad}]).soft_labels(3)
    with pytest.raises(ExpansionError, match="no soft labels"):
        ExpandedSet(tmp_path, [{"label": 0, "parent": 0}]).soft_labels(3)


@pytest.mark.parametrize("mode", ["concat", "global_replacement"])
def test_soft_labels_reach_the_classifier_as_dense_targets(mode):
    """Real images train on one-hot targets, generated ones on their dense target; the loss is the cross-entropy
    over dense targets with the same label smoothing."""
    from experiments.training.settings import SyntheticSettings

    data = build_dataset(compose(["dataset=digits", "dataset.train_per_class=5"]).dataset)
    images, labels, parents = _marked_expansion(data)
    dense = np.zeros((len(labels), 10), dtype=np.float32)
    dense[np.arange(len(labels)), labels] = 0.75
    dense[np.arange(len(labels)), (labels + 3) % 10] += 0.25
    dm = ExpansionDataModule(
        data,
        images,
        dense,
        recipe="digits",
        input_size=8,
        batch_size=10,
        synthetic=SyntheticSettings(mode=mode, p=0.5, soft_labels=True),
        expanded_parents=parents,
    )
    seen = _epochs(dm, 3)
    real_labels = np.asarray(data.train.labels)
    generated = [(j, np.asarray(y)) for _, img, y in seen if (j := _generated_index(img)) is not None]
    real = [(i, np.asarray(y)) for i, img, y in seen if _generated_index(img) is None]
    assert generated and real
    assert all(np.allclose(y, dense[j]) for j, y in generated)
    assert all(np.array_equal(y, np.eye(10)[real_labels[i]]) for i, y in real)  # a real image's position is its index
    model = ImageClassifier(
        "small_cnn", 10, 1, 8, lr=0.1, momentum=0.9, weight_decay=0.0, epochs=1, label_smoothing=0.1
    )
    x, y = torch.randn(4, 1, 8, 8), torch.as_tensor(dense[:4])
    model.log = lambda *a, **k: None
    loss = model.training_step((x, y), 0)
    smoothed = y * 0.9 + 0.1 / 10
    expected = -(smoothed * torch.log_softmax(model(x), 1)).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_soft_labels_need_a_method_that_emits_them():
    from expansion.errors import ExpansionError
    from experiments.training.job import Job

    cfg = compose(["dataset=digits", "method=cutout", "train.synthetic.soft_labels=true"])
    with pytest.raises(ExpansionError, match="emits none"):
        Job.from_config(cfg)
