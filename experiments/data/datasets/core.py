"""Labelled image splits, deterministic seeded splitting, and the errors a
user sees when data is missing or malformed.

Every split yields ``(uint8 tensor [C, H, W], int label)``; when the dataset
config sets ``image_size`` every image is resized to that square size, so
batches stack and the expansion store and classifier see one resolution.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF


class DatasetError(RuntimeError):
    """Bad or missing data, with the cause and the fix in the message."""


class DatasetNotFoundError(DatasetError):
    pass


def missing_dataset(name: str, expected: Path | str, how: str) -> DatasetNotFoundError:
    from ..dataset_paths import missing_message

    return DatasetNotFoundError(missing_message(name, expected, how))


def resize_square(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize uint8 ``[..., C, H, W]`` to ``size x size`` (antialiased bilinear); no-op if already there."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return TF.resize(image, [size, size], antialias=True)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 ``[..., C, H, W]`` between 1 and 3 channels (ITU-R 601 luma for RGB->L)."""
    c = image.shape[-3]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        return TF.rgb_to_grayscale(image, num_output_channels=1)
    if c == 4:
        return match_channels(image[..., :3, :, :], channels)
    raise DatasetError(f"cannot convert an image with {c} channels to {channels}")


class ImageSet(Dataset):
    """A labelled split. Subclasses implement :meth:`load_image` and set ``labels``."""

    labels: np.ndarray
    channels: int
    image_size: int | None

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(int(index))
        image = resize_square(match_channels(image, self.channels), self.image_size)
        return image, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        return SubsetImageSet(self, np.asarray(indices, dtype=np.int64))

    def fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def to_tensor(self) -> torch.Tensor:
        """Decode the whole split into one uint8 tensor ``[N, C, S, S]`` (needs ``image_size``
        or uniformly sized images); every file that cannot be read is named at once
        (:class:`UnreadableImages`)."""
        if len(self) == 0:
            raise DatasetError("cannot stack an empty split")
        images, problems = [], []
        for i in range(len(self)):
            try:
                images.append(self[i][0])
            except DatasetError as exc:
                problems.append(str(exc))
        if problems:
            raise UnreadableImages(problems)
        if len({tuple(im.shape) for im in images}) > 1:
            raise DatasetError("images of different sizes in one split; set dataset.image_size")
        return torch.stack(images)

    def in_memory(self) -> TensorImageSet:
        """The split decoded once into memory (an unreadable file fails here, named)."""
        return TensorImageSet(self.to_tensor(), self.labels, image_size=self.image_size)

    def source_files(self) -> list[Path] | None:
        """The image files this split decodes, in order; None when it is already in memory."""
        return None


#: the most unreadable or oversized images named one by one in an error (the rest are counted)
MAX_IMAGES_NAMED = 20


class UnreadableImages(DatasetError):
    """Images that cannot be read, every one named (up to :data:`MAX_IMAGES_NAMED`, the rest counted)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(name_problems(self.problems))


def name_problems(problems: Sequence[str]) -> str:
    """One line for one problem; for several, their count and each on its own line (up to the cap)."""
    if len(problems) == 1:
        return problems[0]
    shown = list(problems[:MAX_IMAGES_NAMED])
    if len(problems) > MAX_IMAGES_NAMED:
        shown.append(f"... and {len(problems) - MAX_IMAGES_NAMED} more")
    return f"{len(problems)} images cannot be used:\n  " + "\n  ".join(shown)


class TensorImageSet(ImageSet):
    """Images held in memory as one uint8 tensor ``[N, C, H, W]``."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | Sequence[int], *, image_size: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DatasetError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != images.shape[0]:
            raise DatasetError(f"{images.shape[0]} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.channels = images.shape[1]
        self.image_size = image_size

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def to_tensor(self) -> torch.Tensor:
        return resize_square(self.images, self.image_size)

    def in_memory(self) -> TensorImageSet:
        return self

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


class FileImageSet(ImageSet):
    """Images decoded from files on access; an unreadable file is named in the error."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        labels: Sequence[int] | np.ndarray,
        *,
        channels: int = 3,
        image_size: int | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise DatasetError(f"{len(self.paths)} files but {len(self.labels)} labels")
        self.channels = channels
        self.image_size = image_size

    def load_image(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index], self.channels)

    def source_files(self) -> list[Path] | None:
        return list(self.paths)

    def fingerprint(self) -> str:
        """A digest of every file's bytes, its name in its class folder and its label (independent of
        where the data root lives); cached by the files' paths, sizes and modification times."""
        return content_fingerprint(self.paths, self.labels)


#: where :func:`content_fingerprint` keeps what it computed (None: nowhere; the pipeline sets
#: ``<paths.cache_dir>/fingerprints``)
FINGERPRINT_CACHE: Path | None = None


def content_fingerprint(paths: Sequence[Path], labels: np.ndarray) -> str:
    """sha256 over every file's bytes (streamed), its ``class folder/name`` and its label, 16 hex
    characters. The result is cached under :data:`FINGERPRINT_CACHE` by the files' paths, sizes,
    modification times, inodes and change times: a later run re-reads nothing unless a file changed (an
    edit at the same size with its mtime put back still changes its ctime, which no user can set)."""
    from expansion.files import file_stats_digest

    stats = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    try:
        stats.update(file_stats_digest(paths).encode())
    except OSError as exc:
        raise DatasetError(f"image {exc.filename} cannot be read: {exc}") from exc
    cached = None if FINGERPRINT_CACHE is None else Path(FINGERPRINT_CACHE) / f"{stats.hexdigest()[:32]}.txt"
    if cached is not None and cached.is_file():
        text = cached.read_text(errors="replace").strip()
        if re.fullmatch(r"[0-9a-f]{16}", text):
            return text  # else damaged: computed again and rewritten
    h = hashlib.sha256()
    for path, label in zip(paths, labels):
        h.update(f"{path.parent.name}/{path.name}:{int(label)};".encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    digest = h.hexdigest()[:16]
    if cached is not None:
        from expansion.files import atomic_write_text

        atomic_write_text(cached, digest + "\n")
    return digest


#: PIL modes with more than 8 bits per channel (16/32-bit integer, float)
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


#: the largest image (in pixels) read; more is refused as a decompression bomb (PIL's own limit;
#: the config's ``max_image_pixels`` sets it, see :func:`set_max_image_pixels`)
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def set_max_image_pixels(pixels: int | None) -> None:
    """Raise or lower the decompression-bomb limit (None: PIL's default) for this process."""
    global MAX_IMAGE_PIXELS
    if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1):
        raise DatasetError(f"max_image_pixels must be an integer >= 1 or null, got {pixels!r}")
    MAX_IMAGE_PIXELS = int(pixels) if pixels is not None else 89_478_485
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def _bomb(path: Path, pixels: int | None, detail: str) -> DatasetError:
    """The one line for an image over the limit, with a limit that would admit it (the next million
    above its size, at least 4x the current limit)."""
    suggested = max(4 * MAX_IMAGE_PIXELS, -(-(pixels or 0) // 10**6) * 10**6)
    return DatasetError(
        f"image {path} is larger than the decompression-bomb limit of {MAX_IMAGE_PIXELS:,} pixels ({detail}); if "
        f"the file is genuine, raise the limit, e.g. max_image_pixels={suggested}"
    )


def _bomb_pixels(exc: Exception) -> int | None:
    """The pixel count PIL names in its DecompressionBombError ("Image size (N pixels) exceeds ...")."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


@contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """``path`` opened (header read, pixels not yet decoded) and refused before decoding when it is larger
    than :data:`MAX_IMAGE_PIXELS` (a decompression bomb); a failure here or in the block (decoding) is a
    :class:`DatasetError` naming the file."""
    try:
        with Image.open(path) as img:
            pixels = img.width * img.height
            if pixels > MAX_IMAGE_PIXELS:
                raise _bomb(path, pixels, f"{img.width} x {img.height} = {pixels:,} pixels")
            yield img
    except Image.DecompressionBombError as exc:  # PIL refuses at open (more than twice its limit)
        raise _bomb(path, _bomb_pixels(exc), str(exc).split(",")[0]) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"unreadable image {path}: {exc}") from exc


def check_image_header(path: Path) -> str | None:
    """What reading ``path`` would refuse, from its header alone (no decoding): None, or the one line
    (unreadable, or a decompression bomb); for the pre-flight."""
    try:
        with opened_image(path):
            return None
    except DatasetError as exc:
        return str(exc)


def read_image(path: Path, channels: int) -> torch.Tensor:
    """Decode one image file to uint8 ``[channels, H, W]``; any decoding failure names the file, and an
    image larger than :data:`MAX_IMAGE_PIXELS` (a decompression bomb) is refused before it is decoded."""
    with opened_image(path) as img:
        img.load()
        if img.mode in WIDE_MODES:  # PIL's convert would clip every value above 255 to white
            raise DatasetError(
                f"image {path} has {img.mode} pixels (more than 8 bits per channel); convert "
                "the dataset to 8-bit images first (e.g. scale 16-bit scans to 0..255)"
            )
        array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


class SubsetImageSet(ImageSet):
    def __init__(self, base: ImageSet, indices: np.ndarray):
        self.base = base
        self.indices = indices
        self.labels = base.labels[indices]
        self.channels = base.channels
        self.image_size = base.image_size

    def load_image(self, index: int) -> torch.Tensor:
        return self.base.load_image(int(self.indices[index]))

    def source_files(self) -> list[Path] | None:
        files = self.base.source_files()
        return None if files is None else [files[i] for i in self.indices]

    def to_tensor(self) -> torch.Tensor:
        if isinstance(self.base, TensorImageSet):
            return resize_square(self.base.images[torch.from_numpy(self.indices)], self.image_size)
        return super().to_tensor()

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- splits


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``round(fraction * n_c)`` (at least 1 when n_c > 1) of each
    class go to the held-out part. Returns sorted ``(kept, held_out)`` indices."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_out = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:n_out])
        kept.append(idx[n_out:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def per_class_choice(
    labels: np.ndarray, n_per_class: int, seed: int, class_names: Sequence[str], what: str = "train_per_class"
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of exactly ``n_per_class`` indices of every class; returns sorted
    ``(chosen, rest)``. Fails when a class has fewer images."""
    if n_per_class < 1:
        raise DatasetError(f"{what} must be >= 1, got {n_per_class}")
    rng = np.random.default_rng(seed)
    chosen, rest = [], []
    for c in range(len(class_names)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_per_class:
            raise DatasetError(
                f"{what}={n_per_class} but class {c} ({class_names[c]!r}) has only {len(idx)} images in this split"
            )
        idx = idx[rng.permutation(len(idx))]
        chosen.append(idx[:n_per_class])
        rest.append(idx[n_per_class:])
    return np.sort(np.concatenate(chosen)), np.sort(np.concatenate(rest))


@dataclass
class DatasetSplits:
    """A dataset ready for an experiment: train / val / test splits and class names.

    ``identity`` describes exactly which training images an expansion saw; it is
    hashed into the store key together with the training split's fingerprint.
    """

    name: str
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    channels: int
    image_size: int | None
    identity: dict[str, Any] = field(default_factory=dict)
    val_is_carved: bool = False
    #: real training images the classifier sees besides ``train`` (never expanded)
    extra_train: ImageSet | None = None
    #: training images neither in ``train`` nor in ``extra_train`` (left out by the few-shot choice)
    unused_train: ImageSet | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """The data a job trains and is tested on: the identity (with the training split's content
        fingerprint) and the val, test and extra real splits' content fingerprints, 16 hex characters."""
        from expansion.files import content_key

        return content_key(
            {
                "identity": self.identity,
                "val": self.val.fingerprint(),
                "test": self.test.fingerprint(),
                "extra_real": self.extra_train.fingerprint() if self.extra_train is not None else None,
            }
        )[:16]

    def sizes(self) -> dict[str, int]:
        sizes = {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
        if self.extra_train is not None:
            sizes["extra_real"] = len(self.extra_train)
        return sizes

    def in_memory(self, tensor_dir: Path | str | None = None) -> DatasetSplits:
        """Every split decoded into memory once; identity and fingerprints are unchanged. The
        unused pool is decoded when it is first used (it can be much larger than the rest).
        With ``tensor_dir``, splits read from image files are decoded once into a keyed cache
        there (:mod:`experiments.data.tensor_cache`) and loaded from it by later runs."""
        from dataclasses import replace

        def load(split: ImageSet, split_name: str) -> ImageSet:
            files = split.source_files() if tensor_dir is not None else None
            if files is None:
                return split.in_memory()
            from ..tensor_cache import TensorCache, split_source

            source = split_source(self.name, split_name, split.fingerprint(), files)
            images = TensorCache(tensor_dir).get_or_decode(
                source, split.image_size, split.channels, split.labels, split.to_tensor
            )
            return TensorImageSet(images, split.labels, image_size=split.image_size)

        splits = {"train": self.train, "val": self.val, "test": self.test, "extra_train": self.extra_train}
        loaded, problems = {}, []
        for name, split in splits.items():  # every split read before failing: all bad files named at once
            try:
                loaded[name] = load(split, name) if split is not None else None
            except UnreadableImages as exc:
                problems += [p for p in exc.problems if p not in problems]  # a file shared by two splits once
        if problems:
            raise UnreadableImages(problems)
        return replace(self, **loaded)

    def check_labels(self, *, allow_absent_classes: bool = False) -> None:
        """Every split's labels within the classes, and (unless ``allow_absent_classes``) every class
        with at least one training image."""
        for split_name in ("train", "val", "test", "extra_train"):
            split = getattr(self, split_name)
            if split is None:
                continue
            labels = split.labels
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DatasetError(
                    f"dataset {self.name!r}: {split_name} labels span [{labels.min()}, {labels.max()}] "
                    f"but the dataset has {self.num_classes} classes"
                )
        counts = np.bincount(self.train.labels, minlength=self.num_classes)
        absent = [self.class_names[i] for i in np.flatnonzero(counts == 0)]
        if absent and not allow_absent_classes:
            raise DatasetError(
                f"dataset {self.name!r}: the training split has no image of {len(absent)} of its "
                f"{self.num_classes} classes ({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}); a "
                "classifier cannot learn a class it never sees (and one seen class makes every prediction right): "
                "add training images of them, name only the classes the data has in dataset.class_names, or "
                "accept it with dataset.allow_classes_without_training_images=true"
            )
