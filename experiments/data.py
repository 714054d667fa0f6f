"""Training data: original + expanded images, decoded once into memory as
uint8 tensors at the dataset's resolution, concatenated and sampled uniformly."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from expansion.store import ExpandedSet

from .datasets import DatasetError, DatasetSplits
from .datasets.core import match_channels, read_image, resize_square
from .transforms import eval_transform, train_transform


class TensorImages(Dataset):
    """uint8 images ``[N, C, H, W]`` + labels in memory; a transform per item."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | torch.Tensor, transform=None):
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]


def load_expanded_images(expanded: ExpandedSet, channels: int, image_size: int | None) -> torch.Tensor:
    """Decode a finished store into uint8 ``[M, C, S, S]`` matching the dataset's channels and size."""
    images = []
    for path in expanded.paths:
        image = match_channels(read_image(path, 3 if channels == 3 else 1), channels)
        images.append(resize_square(image, image_size))
    if not images:
        raise DatasetError(f"expansion store {expanded.root} holds no images")
    return torch.stack(images)


def split_to_tensor(split, what: str) -> torch.Tensor:
    try:
        return split.to_tensor()
    except RuntimeError as exc:  # torch.stack on unequal sizes
        raise DatasetError(f"{what}: images have different sizes ({exc}); set dataset.image_size") from exc


class ExpansionDataModule(L.LightningDataModule):
    """train = original train (+ expanded images), val and test untouched."""

    def __init__(self, data: DatasetSplits, expanded_images: torch.Tensor | None, expanded_labels: np.ndarray | None,
                 *, recipe: str, input_size: int, batch_size: int, eval_batch_size: int = 512,
                 num_workers: int = 0):
        super().__init__()
        self.data = data
        channels = data.channels
        self.train_tf = train_transform(recipe, input_size, channels)
        self.eval_tf = eval_transform(recipe, input_size, channels)
        parts: list[Dataset] = [TensorImages(split_to_tensor(data.train, "train"), data.train.labels, self.train_tf)]
        if expanded_images is not None:
            parts.append(TensorImages(expanded_images, expanded_labels, self.train_tf))
        self.train_set = ConcatDataset(parts)
        self.val_set = TensorImages(split_to_tensor(data.val, "val"), data.val.labels, self.eval_tf)
        self.test_set = TensorImages(split_to_tensor(data.test, "test"), data.test.labels, self.eval_tf)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)),
            shuffle=train,
            # a last batch of one image breaks BatchNorm: drop it when there is more than one batch
            drop_last=train and len(dataset) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False)
