"""Training data: original + expanded images, decoded once into memory as
uint8 tensors at the dataset's resolution, concatenated and sampled uniformly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from expansion.store import ExpandedSet

from .augment import augment_batch, base_size, check_recipe, normalize, prepare_eval, resize_to, shrink_to
from .datasets import DatasetError, DatasetSplits
from .datasets.core import match_channels, read_image, resize_square
from .tensor_cache import TensorCache, store_source


class TensorImages(Dataset):
    """uint8 images ``[N, C, H, W]`` + labels (int64 ``[N]``, or dense float32 targets ``[N, K]``), in memory.
    A DataLoader over it fetches each batch with one index operation and needs ``collate_fn=whole_batch``."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | torch.Tensor):
        self.images = images
        labels = np.asarray(labels)
        dense = labels.ndim == 2
        self.labels = torch.as_tensor(labels, dtype=torch.float32 if dense else torch.long)
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by one index operation (the DataLoader calls this instead of
        ``__getitem__`` per sample; :func:`whole_batch` is its collate function)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


class ReplacingImages(Dataset):
    """The real training images, each draw replaced with probability ``p`` by a generated image
    (``train.synthetic``): ``local`` picks one of the drawn image's own expansions (``parents[j]`` is the index
    of generated image j's seed among the real images; a real image without expansions is never replaced),
    otherwise any generated image, with its own label. The draws come from torch's global generator, which the
    job's seed fixes (the loader works in the main process or in seeded workers)."""

    def __init__(
        self,
        real: TensorImages,
        generated: TensorImages,
        parents: np.ndarray | torch.Tensor,
        *,
        local: bool,
        p: float,
    ):
        self.real, self.generated, self.local, self.p = real, generated, bool(local), float(p)
        parents = torch.as_tensor(np.asarray(parents), dtype=torch.long)
        if real.labels.ndim != generated.labels.ndim:
            raise DatasetError("real and generated targets differ in kind (class indices vs dense targets)")
        if not len(generated):
            raise DatasetError("a replacement mode (train.synthetic.mode) needs generated images; the store is empty")
        if len(parents) != len(generated):
            raise DatasetError(f"{len(generated)} generated images but {len(parents)} parent indices")
        if len(parents) and (int(parents.min()) < 0 or int(parents.max()) >= len(real)):
            raise DatasetError(f"a generated image's parent index is outside the {len(real)} real images")
        # the generated images of real image i: order[start[i] : start[i] + count[i]]
        self.order = torch.argsort(parents, stable=True)
        self.count = torch.bincount(parents, minlength=len(real))
        self.start = torch.cumsum(self.count, 0) - self.count

    def __len__(self) -> int:
        return len(self.real)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, labels = self.real.images[index].clone(), self.real.labels[index].clone()
        replace = torch.rand(len(index)) < self.p
        if self.local:
            count = self.count[index]
            replace &= count > 0
            # uniform among the image's own expansions (an image without any keeps its own slot: not replaced)
            offset = torch.minimum((torch.rand(len(index)) * count).long(), (count - 1).clamp_min(0))
            chosen = self.order[(self.start[index] + offset).clamp_max(len(self.order) - 1)]
        else:
            chosen = torch.randint(0, len(self.generated), (len(index),))
        if replace.any():
            images[replace] = self.generated.images[chosen[replace]]
            labels[replace] = self.generated.labels[chosen[replace]]
        return images, labels


def whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for :meth:`TensorImages.__getitems__`: the batch is already stacked."""
    return batch


def load_expanded_images(
    expanded: ExpandedSet, channels: int, image_size: int | None, tensor_dir: Path | str | None = None
) -> torch.Tensor:
    """Decode a finished store into uint8 ``[M, C, S, S]`` matching the dataset's channels and size;
    with ``tensor_dir`` the decoded tensor is cached there by key (:mod:`experiments.data.tensor_cache`)."""
    if not len(expanded):
        raise DatasetError(f"expansion store {expanded.root} holds no images")

    def decode() -> torch.Tensor:
        images = []
        for path in expanded.paths:
            image = match_channels(read_image(path, 3 if channels == 3 else 1), channels)
            images.append(resize_square(image, image_size))
        return torch.stack(images)

    if tensor_dir is None:
        return decode()
    return TensorCache(tensor_dir).get_or_decode(store_source(expanded), image_size, channels, expanded.labels, decode)


class ExpansionDataModule(L.LightningDataModule):
    """train = original train (unless ``include_original`` is false: the generated-only
    protocol) + the split's extra real images (if any) + expanded images; val and test untouched.

    All images are decoded once into uint8 tensors at the recipe's base size
    (val/test also centre-cropped); batches of uint8 travel to the device and
    are augmented there as a whole (:mod:`experiments.data.augment`)."""

    def __init__(
        self,
        data: DatasetSplits,
        expanded_images: torch.Tensor | None,
        expanded_labels: np.ndarray | None,
        *,
        recipe: str,
        input_size: int,
        batch_size: int,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        include_original: bool = True,
        test_every_epoch: bool = False,
        online_augment: Any = None,
        synthetic: Any = None,
        expanded_parents: np.ndarray | None = None,
    ):
        super().__init__()
        check_recipe(recipe)
        if not include_original and expanded_images is None:
            raise DatasetError(
                "training on generated images only (train.include_original=false) needs an "
                "expansion method; method=original has no generated images"
            )
        self.data = data
        self.recipe, self.input_size = recipe, int(input_size)
        size = base_size(recipe, self.input_size)
        # downsample once (antialiased) when stored larger than the recipe needs; upsampling is left
        # to the batched ops on the device, so e.g. 28 px MedMNIST at 224 px costs 28 px of memory
        real = [data.train] if include_original else []
        if data.extra_train is not None:
            real.append(data.extra_train)
        parts = [shrink_to(split.to_tensor(), size) for split in real]
        labels = [torch.as_tensor(split.labels, dtype=torch.long) for split in real]
        generated = None
        if expanded_images is not None:
            # expanded images take the side of the original images as stored here
            side = shrink_to(data.train.to_tensor()[:1], size).shape[-1]
            generated = TensorImages(resize_to(expanded_images, side), np.asarray(expanded_labels))
            if generated.labels.ndim == 2:  # dense targets (train.synthetic.soft_labels): the real ones one-hot
                labels = [F.one_hot(y, data.num_classes).float() for y in labels]
        if synthetic is not None and synthetic.replaces:
            if generated is None or expanded_parents is None:
                raise DatasetError(
                    f"train.synthetic.mode={synthetic.mode} replaces real images by generated ones: it needs an "
                    "expansion method and the store's parent indices"
                )
            real_set = TensorImages(torch.cat(parts), torch.cat(labels))
            local = synthetic.mode == "local_replacement"
            self.train_set = ReplacingImages(real_set, generated, expanded_parents, local=local, p=synthetic.p)
        else:
            if generated is not None:
                parts.append(generated.images)
                labels.append(generated.labels)
            self.train_set = TensorImages(torch.cat(parts), torch.cat(labels))
        self.val_set = TensorImages(shrink_to(data.val.to_tensor(), size), data.val.labels)
        self.test_set = TensorImages(shrink_to(data.test.to_tensor(), size), data.test.labels)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.test_every_epoch = test_every_epoch
        self.online_augment = online_augment  # an Expander applied to every training batch (train.online_augment)

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def _loader(
        self, dataset: Dataset, batch_size: int, train: bool, generator: torch.Generator | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=min(batch_size, len(dataset)),
            shuffle=train,
            # the last incomplete batch is dropped when there is more than one (a batch of one image
            # breaks BatchNorm; with shuffling every image is still seen)
            drop_last=train and len(dataset) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=whole_batch,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val set; with ``test_every_epoch`` also the test set, whose loader draws its base seed
        from its own generator (a loader's iterator draws one from the global generator otherwise,
        which would change the next epoch's shuffling and augmentation)."""
        val = self._loader(self.val_set, self.eval_batch_size, False)
        if not self.test_every_epoch:
            return val
        return [val, self._loader(self.test_set, self.eval_batch_size, False, generator=torch.Generator())]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            if self.online_augment is not None:
                images = online_augment_batch(self.online_augment, images, labels)
            return augment_batch(images, self.recipe, self.input_size), labels
        return normalize(prepare_eval(images, self.recipe, self.input_size)), labels


def online_augment_batch(expander: Any, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One expansion of each image of a uint8 training batch (``train.online_augment``): the expander's
    per-image seeds are drawn from torch's global generator, which the job's seed fixes, so a run is
    repeatable and every step sees fresh draws (dense targets: the expander sees their top class)."""
    seeds = torch.randint(0, 2**31 - 1, (images.shape[0], 1), dtype=torch.int64)
    if labels.ndim == 2:
        labels = labels.argmax(1)
    out = expander.expand(images, labels, seeds).images
    return out[:, 0].to(images.device)
