"""Typed settings of a job's training side, built from the config's ``train:`` and ``classifier:``
sections (the values live in conf/config.yaml and conf/classifier/; these classes check them and
say which ones change a trained classifier)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any

from expansion.errors import ExpansionError
from expansion.settings import check_ranges, field_signature, speed_only


@dataclass(frozen=True)
class TrainSettings:
    """The classifier's training (values: the ``train:`` section of conf/config.yaml): ``epochs`` of SGD
    (``momentum``, ``weight_decay``) at ``lr`` with a linear warm-up of ``warmup_epochs`` then a
    cosine schedule, ``batch_size``, ``label_smoothing``; ``include_original: false`` trains on the
    generated images only; ``compare_original`` (true, false or auto = single runs only) also trains
    on the original images in the same job. Speed only: ``eval_batch_size``, ``num_workers``,
    ``compile`` (false, true or a torch.compile backend), ``test_every_epoch`` (also test after every
    epoch, for the official scripts' selection, the best test epoch: a reported column, never a
    selection rule of ours; it does not change the training)."""

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
            ],
        )


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
        from .classifier import check_arch

        check_arch(self.arch)

    def signature(self) -> dict[str, Any]:
        return {k: v for k, v in field_signature(self).items() if k != "name"}
