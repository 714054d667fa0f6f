"""Typed settings of a job's training side, built from the config's ``train:`` and ``classifier:``
sections (the values live in conf/config.yaml and conf/classifier/; these classes check them and
say which ones change a trained classifier)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any

from expansion.errors import ExpansionError
from expansion.settings import check_ranges, field_signature, keyed_when_set, speed_only

#: the offline baselines that ``train.online_augment`` can also apply on the fly (conf/method/<name>.yaml)
ONLINE_AUGMENTS = ("randaugment", "cutout", "gridmask")
#: how generated images enter training (``train.synthetic.mode``)
SYNTHETIC_MODES = ("concat", "local_replacement", "global_replacement")


@dataclass(frozen=True)
class SyntheticSettings:
    """How generated images enter training (``train.synthetic``). ``concat``: the generated images join the real
    ones, every image once per epoch (the GIF papers). ``local_replacement``: each real image a batch draws is
    replaced, with probability ``p``, by one of its own expansions drawn uniformly (DA-Fusion's
    ``synthetic_probability``). ``global_replacement``: with probability ``p`` by a generated image drawn
    uniformly from the whole generated set, with that image's label (Diff-Mix's and DiffDA-Eval's few-shot
    default). In the replacement modes an epoch is one pass over the real images, so a run trains the steps of
    the real set (compute-matched to the original by construction); draws come from the job's seeded generator.
    Generated images alone: ``train.include_original=false``. ``soft_labels``: a generated image is trained on its
    store's dense target (``(1 - w) onehot(label) + w onehot(soft_target)``, a method's manifest fields) with the
    cross-entropy over dense targets (``train.label_smoothing`` applies to them too: DiffDA-Eval's loss); real
    images keep their one-hot targets. A store without the fields is an error."""

    mode: str = "concat"
    p: float = 0.5
    soft_labels: bool = False

    def __post_init__(self) -> None:
        check_ranges(
            self,
            [
                (self.mode in SYNTHETIC_MODES, "mode", f"one of {', '.join(SYNTHETIC_MODES)}"),
                (0.0 <= self.p <= 1.0, "p", "in [0, 1]"),
            ],
        )

    @property
    def replaces(self) -> bool:
        return self.mode != "concat"


@dataclass(frozen=True)
class TrainSettings:
    """The classifier's training (values: the ``train:`` section of conf/config.yaml): ``epochs`` of SGD
    (``momentum``, ``weight_decay``) at ``lr`` with a linear warm-up of ``warmup_epochs`` then a
    cosine schedule, ``batch_size``, ``label_smoothing``; ``include_original: false`` trains on the
    generated images only; ``compare_original`` (true, false or auto = single runs only) also trains
    on the original images in the same job. ``steps`` (an optimizer-step budget) or
    ``steps_matched_to_ratio`` R (the steps the same job takes on the original plus R x generated
    images in ``epochs`` epochs: the compute-matched partner of ``method.ratio=R``) override
    ``epochs``: the job trains exactly that many optimizer steps (see :func:`optimizer_budget`). Speed only: ``eval_batch_size``, ``num_workers``,
    ``compile`` (false, true or a torch.compile backend), ``test_every_epoch`` (also test after every
    epoch, for the official scripts' selection, the best test epoch: a reported column, never a
    selection rule of ours; it does not change the training). ``online_augment`` (none or one of
    :data:`ONLINE_AUGMENTS`): the offline baseline of that name, at its default settings, applied on the
    fly to every training image of every batch (one fresh draw per image and step, from the job's seed)
    before the dataset's recipe augmentation: the reference an offline expansion must beat."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int
    label_smoothing: float
    include_original: bool
    eval_batch_size: int = speed_only(MISSING)
    num_workers: int = speed_only(MISSING)
    compile: bool | str = speed_only(MISSING)
    compare_original: bool | str = speed_only(MISSING)
    test_every_epoch: bool = speed_only(MISSING)
    steps: int | None = keyed_when_set(None)  # keyed only when set: earlier checkpoints still resume
    steps_matched_to_ratio: int | None = keyed_when_set(None)
    online_augment: str = keyed_when_set("none")
    synthetic: SyntheticSettings = keyed_when_set(default_factory=SyntheticSettings)

    def __post_init__(self) -> None:
        check_ranges(
            self,
            [
                (self.epochs >= 1, "epochs", "an integer >= 1"),
                (self.batch_size >= 1, "batch_size", "an integer >= 1"),
                (self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1"),
                (self.lr > 0, "lr", "> 0"),
                (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
                (self.weight_decay >= 0, "weight_decay", ">= 0"),
                (0 <= self.warmup_epochs < self.epochs, "warmup_epochs", f"in [0, epochs = {self.epochs})"),
                (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
                (self.num_workers >= 0, "num_workers", ">= 0"),
                (self.compare_original in (True, False, "auto"), "compare_original", "true, false or auto"),
                (self.steps is None or _is_count(self.steps), "steps", "null or an integer >= 1"),
                (
                    self.steps_matched_to_ratio is None or _is_count(self.steps_matched_to_ratio),
                    "steps_matched_to_ratio",
                    "null or an integer >= 1 (a method.ratio)",
                ),
                (
                    self.online_augment in ("none", *ONLINE_AUGMENTS),
                    "online_augment",
                    f"one of none, {', '.join(ONLINE_AUGMENTS)}",
                ),
                (
                    self.include_original or not self.synthetic.replaces,
                    "synthetic.mode",
                    "concat when train.include_original=false (a replacement mode replaces real images)",
                ),
                (
                    self.steps is None or self.steps_matched_to_ratio is None,
                    "steps",
                    "null when train.steps_matched_to_ratio is set (one step budget, not two)",
                ),
            ],
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimizer steps of one epoch: the last incomplete batch is dropped when there is more than one
    (experiments.data.datamodule), one step when the set fits in one batch."""
    return num_train // batch_size if num_train > batch_size else 1


@dataclass(frozen=True)
class OptimizerBudget:
    """How long a job trains: ``epochs`` (the cosine schedule's length and the Trainer's max_epochs),
    ``max_steps`` (-1 = the epochs' natural end) and ``val_every`` (validate every n epochs)."""

    epochs: int
    max_steps: int
    val_every: int
    steps: int  # the optimizer steps the job will take

    def as_dict(self) -> dict[str, int]:
        return {"epochs": self.epochs, "max_steps": self.max_steps, "val_every": self.val_every, "steps": self.steps}


def optimizer_budget(train: TrainSettings, num_train: int, num_base: int) -> OptimizerBudget:
    """The job's training length. By default ``train.epochs`` epochs over its ``num_train`` images. With
    ``train.steps`` S or ``train.steps_matched_to_ratio`` R (S = epochs x steps_per_epoch((1 + R) x
    ``num_base``), ``num_base`` = the few-shot original images, so a real-arm job with extra real images
    matches the generated set of the same ratio): exactly S optimizer steps, over ceil(S / steps per
    epoch) epochs (the last one cut at S), the per-epoch cosine spanning them; the job validates every
    ceil(those epochs / train.epochs) epochs so that best-val selection sees about ``train.epochs``
    candidates in every arm. A job whose S equals its own epochs x steps per epoch is the epoch run, step for
    step (our departure from a per-step schedule, so that the expanded arm is shared by both protocols)."""
    per_epoch = steps_per_epoch(num_train, train.batch_size)
    if train.steps is None and train.steps_matched_to_ratio is None:
        return OptimizerBudget(train.epochs, -1, 1, train.epochs * per_epoch)
    if train.steps is not None:
        steps = train.steps
    else:
        steps = train.epochs * steps_per_epoch((1 + train.steps_matched_to_ratio) * num_base, train.batch_size)
    epochs = -(-steps // per_epoch)
    if train.warmup_epochs >= epochs:
        raise ExpansionError(
            f"train.warmup_epochs={train.warmup_epochs} is not below the {epochs} epochs that {steps} steps "
            f"take on {num_train} images; lower train.warmup_epochs"
        )
    return OptimizerBudget(epochs, steps, max(1, -(-epochs // train.epochs)), steps)


@dataclass(frozen=True)
class ClassifierSettings:
    """The network (values: conf/classifier/<name>.yaml): ``arch`` (small_cnn, a timm model name or
    ``torchvision.<name>``; always trained from scratch), ``input_size`` (None = the dataset's
    image_size), ``channels_last`` and extra ``kwargs`` for the network; ``name`` labels the results."""

    name: str
    arch: str
    input_size: int | None
    channels_last: bool
    kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        if self.input_size is not None and self.input_size < 8:
            raise ExpansionError(f"input_size must be >= 8 px or null, got {self.input_size}")
        check_arch(self.arch)

    def signature(self) -> dict[str, Any]:
        return {k: v for k, v in field_signature(self).items() if k != "name"}


@dataclass(frozen=True)
class GenerationSettings:
    """How the engine runs the method: the predict Trainer's arguments (the job's trainer without
    training-only keys, full precision: expanders manage their own dtypes), where stores and fits live,
    how long to wait for another job's lock, how a finished store is verified; speed only: seeds per
    ``expand`` call (``method.batch_size``: every image has its own seed, so the images do not depend on
    it) and loader workers (``method.num_workers``)."""

    trainer: dict[str, Any]
    store_dir: str
    fit_dir: str
    lock_timeout: float
    verify: str
    batch_size: int = speed_only(MISSING)
    num_workers: int = speed_only(MISSING)

    def __post_init__(self) -> None:
        from expansion.engine import VERIFY_LEVELS

        if self.verify not in VERIFY_LEVELS:
            raise ExpansionError(f"store_verify must be one of {VERIFY_LEVELS}, got {self.verify!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ExpansionError(
                f"method.batch_size must be >= 1 and method.num_workers >= 0, got "
                f"{self.batch_size} and {self.num_workers}"
            )


def core_settings(cfg: Any) -> tuple[TrainSettings, ClassifierSettings, int]:
    """The job's training and classifier settings and its thread count (``threads``), checked: a bad value is
    one :class:`ExpansionError` naming its key. It needs no torch, so run.py checks a single run with it
    before the heavy imports (a typo'd value is an error in a second, not after loading torch)."""
    from omegaconf import OmegaConf

    from expansion.settings import from_mapping

    train = from_mapping(TrainSettings, OmegaConf.to_container(cfg.train, resolve=True), "train")
    classifier = from_mapping(ClassifierSettings, OmegaConf.to_container(cfg.classifier, resolve=True), "classifier")
    threads = cfg.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ExpansionError(f"threads={threads!r} is not a thread count (an integer >= 1, e.g. threads=1)")
    return train, classifier, threads


def check_arch(arch: str) -> None:
    """An error now (before any data or generation) when ``arch`` names no network :func:`create_network` knows."""
    if arch == "small_cnn":
        return
    if arch.startswith("torchvision."):
        import torchvision

        if arch.split(".", 1)[1] not in torchvision.models.list_models():
            raise ValueError(
                f"unknown classifier arch {arch!r}: torchvision has no model "
                f"{arch.split('.', 1)[1]!r} (torchvision.models.list_models())"
            )
        return
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown classifier arch {arch!r}: not small_cnn, torchvision.<name>, or a timm model")
