"""The classifier that proves (or disproves) an expansion's value.

Networks are trained from scratch (no pretrained weights), as in the GIF
protocol: SGD momentum 0.9, weight decay 1e-4, per-dataset lr, one cosine
schedule for every run of a table.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from expansion.probe import SmallConvNet

from .settings import check_arch


def create_network(arch: str, num_classes: int, in_chans: int, input_size: int, **kwargs: Any) -> nn.Module:
    """``small_cnn``, any timm model name (resnet50, resnext50_32x4d, wide_resnet50_2,
    mobilenetv2_100, ...) or ``torchvision.<name>``; always randomly initialised."""
    check_arch(arch)
    if arch == "small_cnn":
        return SmallConvNet(num_classes, in_chans, input_size=input_size, **kwargs)
    if arch.startswith("torchvision."):
        import torchvision

        net = torchvision.models.get_model(arch.split(".", 1)[1], weights=None, num_classes=num_classes, **kwargs)
        return _ChannelAdapter(net, in_chans) if in_chans != 3 else net
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


class _ChannelAdapter(nn.Module):
    """Feeds 1-channel images to a 3-channel torchvision network by repetition."""

    def __init__(self, net: nn.Module, in_chans: int):
        super().__init__()
        self.net, self.in_chans = net, in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training with SGD + cosine annealing (per epoch) and top-1 accuracy
    on val and test. ``val_history`` holds the val accuracy of every epoch; ``test_history`` the
    test accuracy of every epoch when the datamodule also gives the test set as a second
    validation loader (``train.test_every_epoch``).

    ``compile``: False, True (``torch.compile`` with inductor) or a torch.compile backend name;
    the network is compiled in place, so checkpoints keep the same keys either way."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_chans: int,
        input_size: int,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        epochs: int = 100,
        warmup_epochs: int = 0,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        net_kwargs: dict[str, Any] | None = None,
        compile: bool | str = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = create_network(arch, num_classes, in_chans, input_size, **(net_kwargs or {}))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile(**({} if compile is True else {"backend": str(compile)}))
        # labels are checked once when the data is loaded; the per-step value checks of torchmetrics
        # (torch.unique) would wait for the device at every step
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.epoch_test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        # the class-balance-aware scores of a test pass (read from test_scores after trainer.test)
        self.test_balanced_acc = MulticlassAccuracy(num_classes, average="macro", validate_args=False)
        self.test_per_class_acc = MulticlassAccuracy(num_classes, average="none", validate_args=False)
        self.test_auc = MulticlassAUROC(num_classes, average="macro", validate_args=False)
        self.test_scores: dict[str, Any] = {}
        self.val_history: list[float] = []
        self.test_history: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        # dense targets (train.synthetic.soft_labels): the cross-entropy over them, smoothed the same way
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits.detach(), y.argmax(1) if y.ndim == 2 else y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        if dataloader_idx == 0:
            self.val_acc(self(x), y)
            self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, add_dataloader_idx=False)
        else:  # the test set, after every epoch (train.test_every_epoch)
            self.epoch_test_acc(self(x), y)
            self.log("test/acc_epoch", self.epoch_test_acc, on_step=False, on_epoch=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_history.append(float(self.trainer.callback_metrics["val/acc"]))
        if "test/acc_epoch" in self.trainer.callback_metrics:
            self.test_history.append(float(self.trainer.callback_metrics["test/acc_epoch"]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a resumed run still knows its best epoch (and the test accuracy of the epochs before it)
        checkpoint["val_history"] = list(self.val_history)
        checkpoint["test_history"] = list(self.test_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.val_history = [float(v) for v in checkpoint.get("val_history", [])]
        self.test_history = [float(v) for v in checkpoint.get("test_history", [])]

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        scores = logits.float().softmax(dim=-1)
        for metric in (self.test_balanced_acc, self.test_per_class_acc, self.test_auc):
            metric.update(scores, y)

    def on_test_epoch_end(self) -> None:
        """Balanced accuracy (mean per-class recall), per-class recall and macro one-vs-rest ROC AUC of the
        pass, in percent (MedMNIST's ACC and AUC pair; for two classes the AUC is the binary one)."""
        self.test_scores = {
            "balanced_acc": 100.0 * float(self.test_balanced_acc.compute()),
            "per_class_acc": [round(100.0 * float(v), 4) for v in self.test_per_class_acc.compute()],
            "auc": 100.0 * float(self.test_auc.compute()),
        }
        for metric in (self.test_balanced_acc, self.test_per_class_acc, self.test_auc):
            metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

        def lr_lambda(epoch: int) -> float:
            # linear warm-up, then cosine from lr to 0 over the remaining epochs (one schedule for all runs)
            if epoch < hp.warmup_epochs:
                return (epoch + 1) / hp.warmup_epochs
            span = max(1, hp.epochs - hp.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - hp.warmup_epochs) / span))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
