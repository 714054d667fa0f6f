"""Classic augmentation baselines (Cutout, GridMask, RandAugment) on real images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from baselines import Cutout, GridMask, RandAugment
from expansion.base import ExpansionError
from expansion.seeding import image_seeds

REPO = Path(__file__).resolve().parents[1]
BREAST = Path("/work/shared/data/medmnist/breastmnist.npz")
CIFAR = Path("/work/shared/data/cifar10_subset/train")


# -- real images -------------------------------------------------------------
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.round(d.images[:12] * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(imgs).unsqueeze(1), torch.from_numpy(d.target[:12]).long()


def _breast() -> tuple[torch.Tensor, torch.Tensor]:
    if not BREAST.exists():
        pytest.skip(f"{BREAST} not available")
    with np.load(BREAST) as z:
        imgs, labels = z["train_images"][:12], z["train_labels"][:12, 0]
    return torch.from_numpy(imgs).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _cifar() -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    classes = sorted(p.name for p in CIFAR.iterdir()) if CIFAR.exists() else []
    if not classes:
        pytest.skip(f"{CIFAR} not available")
    imgs, labels = [], []
    for c, name in enumerate(classes[:6]):
        for i in range(2):
            arr = np.asarray(Image.open(CIFAR / name / f"{i:04d}.jpg").convert("RGB"))
            imgs.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            labels.append(c)
    return torch.stack(imgs), torch.tensor(labels)


DATA = {"digits8": _digits, "breast28": _breast, "cifar32rgb": _cifar}
_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in _cache:
        _cache[name] = DATA[name]()
    imgs, labels = _cache[name]
    return imgs.clone(), labels.clone()


MAKERS = {
    "cutout": lambda k: Cutout(k),
    "gridmask": lambda k: GridMask(k),
    "gridmask_rot": lambda k: GridMask(k, max_rotation=45.0),
    "randaugment": lambda k: RandAugment(k),
}
FIELDS = {
    "cutout": {"cutout_cy", "cutout_cx", "cutout_size"},
    "gridmask": {"grid_d", "grid_dx", "grid_dy", "grid_angle"},
    "gridmask_rot": {"grid_d", "grid_dx", "grid_dy", "grid_angle"},
    "randaugment": set(),
}


def seeds_for(n: int, k: int, store_seed: int = 0) -> torch.Tensor:
    return image_seeds(store_seed, list(range(n)), k)


# -- the contract, for every baseline ------------------------------------------
@pytest.mark.parametrize("dataset", list(DATA))
@pytest.mark.parametrize("method", list(MAKERS))
def test_contract(method: str, dataset: str) -> None:
    k = 3
    imgs, labels = data(dataset)
    imgs, labels = imgs[:6], labels[:6]
    imgs_before, labels_before = imgs.clone(), labels.clone()
    exp = MAKERS[method](k)
    seeds = seeds_for(6, k)

    out = exp.expand(imgs, labels, seeds)
    B, C, H, W = imgs.shape
    assert out.images.dtype == torch.uint8
    assert out.images.shape == (B, k, C, H, W)
    out.validate(B, k)
    assert FIELDS[method] <= set(out.fields)
    for name, values in out.fields.items():
        n = values.numel() if isinstance(values, torch.Tensor) else len(values)
        assert n == B * k, name
    assert len(out.field_rows()) == B * k
    # inputs untouched (labels and seed images are never modified in place)
    assert torch.equal(labels, labels_before)
    assert torch.equal(imgs, imgs_before)

    # same seeds -> identical output
    again = MAKERS[method](k).expand(imgs, labels, seeds.clone())
    assert torch.equal(out.images, again.images)
    # different seeds -> different output
    other = exp.expand(imgs, labels, seeds_for(6, k, store_seed=1))
    assert not torch.equal(out.images, other.images)
    # copies of one seed differ from each other
    assert not torch.equal(out.images[:, 0], out.images[:, 1])

    # batch-size independence: one batch of 6 == two batches of 3, bitwise
    a = exp.expand(imgs[:3], labels[:3], seeds[:3])
    b = exp.expand(imgs[3:], labels[3:], seeds[3:])
    assert torch.equal(out.images, torch.cat([a.images, b.images]))
    for name in out.fields:
        whole = out.field_rows()
        halves = a.field_rows() + b.field_rows()
        assert [r[name] for r in whole] == [r[name] for r in halves], name
    # batch composition: a permuted batch yields the permuted results
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    p = exp.expand(imgs[perm], labels[perm], seeds[perm])
    assert torch.equal(p.images, out.images[perm])


@pytest.mark.parametrize("make", [Cutout, GridMask, RandAugment])
def test_ratio_must_be_integer_ge_1(make) -> None:
    for bad in (0, -1, 2.5):
        with pytest.raises(ExpansionError):
            make(bad)
    assert make(2.0).ratio == 2


# -- Cutout --------------------------------------------------------------------
@pytest.mark.parametrize("dataset", list(DATA))
@pytest.mark.parametrize("fill", [0, 77])
def test_cutout_hole(dataset: str, fill: int) -> None:
    imgs, labels = data(dataset)
    k = 8
    exp = Cutout(k, size=0.5, fill=fill)
    out = exp.expand(imgs, labels, seeds_for(len(imgs), k))
    _, _, H, W = imgs.shape
    s = math.floor(0.5 * min(H, W) + 0.5)
    rows = out.field_rows()
    inside = 0
    for i, row in enumerate(rows):
        b, j = divmod(i, k)
        assert row["cutout_size"] == s
        cy, cx = row["cutout_cy"], row["cutout_cx"]
        assert 0 <= cy < H and 0 <= cx < W
        y0, x0 = cy - s // 2, cx - s // 2
        hole = torch.zeros(H, W, dtype=torch.bool)
        hole[max(y0, 0) : max(min(y0 + s, H), 0), max(x0, 0) : max(min(x0 + s, W), 0)] = True
        o, src = out.images[b, j], imgs[b]
        assert (o[:, hole] == fill).all()  # the hole is exactly fill-valued
        assert torch.equal(o[:, ~hole], src[:, ~hole])  # the rest is unchanged
        if y0 >= 0 and y0 + s <= H and x0 >= 0 and x0 + s <= W:
            inside += 1
            assert int(hole.sum()) == s * s
    assert inside > 0


def test_cutout_geometry_on_blank_image() -> None:
    """On a constant image the hole is the set of fill pixels: a clipped s x s square."""
    H = W = 28
    n, k = 64, 4
    imgs = torch.full((n, 1, H, W), 255, dtype=torch.uint8)
    out = Cutout(k, size=0.5).expand(imgs, torch.zeros(n, dtype=torch.long), seeds_for(n, k))
    s = 14
    holes = out.images[:, :, 0] == 0  # [n, k, H, W]
    cy = out.fields["cutout_cy"]
    cx = out.fields["cutout_cx"]
    for b in range(n):
        for j in range(k):
            ys, xs = torch.nonzero(holes[b, j], as_tuple=True)
            y0, x0 = int(cy[b, j]) - s // 2, int(cx[b, j]) - s // 2
            assert ys.min() == max(y0, 0) and ys.max() == min(y0 + s, H) - 1
            assert xs.min() == max(x0, 0) and xs.max() == min(x0 + s, W) - 1
            assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a full rectangle
    # the centre is uniform over the whole image: it reaches the borders
    assert cy.min() <= 1 and cy.max() >= H - 2 and cx.min() <= 1 and cx.max() >= W - 2


def test_cutout_rejects_bad_settings() -> None:
    with pytest.raises(ExpansionError):
        Cutout(1, size=-0.1)
    with pytest.raises(ExpansionError):
        Cutout(1, fill=300)


# -- GridMask ------------------------------------------------------------------
def _reference_keep(d: int, dy: int, dx: int, r: float, H: int, W: int) -> np.ndarray:
    """Independent numpy version of the official mode-1 grid (no rotation)."""
    band = math.ceil(r * d - 1e-9)
    rows = np.zeros(H, dtype=bool)
    cols = np.zeros(W, dtype=bool)
    for i in range(-1, max(H, W) // d + 2):  # kept bands [d*i + offset, d*i + offset + band)
        s = d * i + dy
        rows[max(s, 0) : max(min(s + band, H), 0)] = True
        s = d * i + dx
        cols[max(s, 0) : max(min(s + band, W), 0)] = True
    return rows[:, None] | cols[None, :]


def _separable(dropped: torch.Tensor) -> bool:
    """An axis-aligned grid drops exactly (dropped rows) x (dropped columns)."""
    return torch.equal(dropped, dropped.any(1, keepdim=True) & dropped.any(0, keepdim=True))


@pytest.mark.parametrize("dataset", list(DATA))
def test_gridmask_kept_unchanged_dropped_fill(dataset: str) -> None:
    imgs, labels = data(dataset)
    k, r = 4, 0.6
    for fill in (0, 200):
        exp = GridMask(k, keep_ratio=r, fill=fill)
        out = exp.expand(imgs, labels, seeds_for(len(imgs), k))
        _, _, H, W = imgs.shape
        lo, hi = exp.unit_range(H, W)
        for i, row in enumerate(out.field_rows()):
            b, j = divmod(i, k)
            d, dy, dx = row["grid_d"], row["grid_dy"], row["grid_dx"]
            assert lo <= d <= hi and d >= 2 and 0 <= dy < d and 0 <= dx < d
            assert row["grid_angle"] == 0.0
            keep = torch.from_numpy(_reference_keep(d, dy, dx, r, H, W))
            o, src = out.images[b, j], imgs[b]
            assert torch.equal(o[:, keep], src[:, keep])
            assert (o[:, ~keep] == fill).all()


def test_gridmask_dropped_fraction() -> None:
    """200 images of 64 x 64: the dropped fraction matches the exact expectation
    E_d[((d - l) / d)^2] of the discretisation and is close to (1 - r)^2."""
    n, H, r = 200, 64, 0.6
    imgs = torch.full((n, 1, H, H), 255, dtype=torch.uint8)
    exp = GridMask(1, keep_ratio=r)
    out = exp.expand(imgs, torch.zeros(n, dtype=torch.long), seeds_for(n, 1))
    dropped = (out.images == 0).float().mean().item()
    lo, hi = exp.unit_range(H, H)
    exact = np.mean([((d - math.ceil(r * d - 1e-9)) / d) ** 2 for d in range(lo, hi + 1)])
    assert abs(dropped - exact) < 0.02, (dropped, exact)
    assert abs(dropped - (1 - r) ** 2) < 0.06
    assert all(_separable(m) for m in out.images[:, 0, 0] == 0)  # axis-aligned squares
    # the unit size covers its whole range
    d = out.fields["grid_d"]
    assert d.min() <= lo + 3 and d.max() >= hi - 3


def test_gridmask_rotation() -> None:
    n, H, r, rot = 100, 64, 0.6, 45.0
    imgs = torch.full((n, 1, H, H), 255, dtype=torch.uint8)
    out = GridMask(1, keep_ratio=r, max_rotation=rot).expand(imgs, torch.zeros(n, dtype=torch.long), seeds_for(n, 1))
    angle = out.fields["grid_angle"]
    assert (angle >= 0).all() and (angle <= rot).all() and angle.max() > 20
    dropped = (out.images == 0).float().mean().item()
    assert abs(dropped - (1 - r) ** 2) < 0.06
    # a rotated grid is not axis-aligned: the dropped set is no longer rows x columns
    masks = out.images[:, 0, 0] == 0
    assert sum(not _separable(m) for m in masks) > n // 2


def test_gridmask_keep_ratio_one_is_identity() -> None:
    imgs, labels = data("breast28")
    out = GridMask(2, keep_ratio=1.0).expand(imgs, labels, seeds_for(len(imgs), 2))
    assert torch.equal(out.images, imgs.unsqueeze(1).expand_as(out.images))


def test_gridmask_rejects_bad_settings() -> None:
    for kwargs in ({"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"d_min": 0.8, "d_max": 0.4}, {"max_rotation": -1}):
        with pytest.raises(ExpansionError):
            GridMask(1, **kwargs)


# -- RandAugment ---------------------------------------------------------------
@pytest.mark.parametrize("dataset", list(DATA))
def test_randaugment_changes_most_images(dataset: str) -> None:
    imgs, labels = data(dataset)
    k = 4
    out = RandAugment(k).expand(imgs, labels, seeds_for(len(imgs), k))
    assert out.images.shape[2] == imgs.shape[1]  # 1 or 3 channels preserved
    changed = (out.images != imgs.unsqueeze(1)).flatten(2).any(-1).float().mean().item()
    assert changed > 0.7, changed
    ops = out.fields.get("randaugment_ops")
    if ops is not None:  # recorded when torchvision exposes the hook
        assert len(ops) == len(imgs) * k and all(len(o.split("|")) == 2 for o in ops)


def test_randaugment_leaves_global_state_alone() -> None:
    imgs, labels = data("digits8")
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    RandAugment(2).expand(imgs[:4], labels[:4], seeds_for(4, 2))
    assert torch.equal(torch.rand(3), expected)  # RNG forked, not consumed
    assert torch.get_num_threads() == threads  # thread count restored


def test_randaugment_gray_stacked_to_rgb() -> None:
    imgs, labels = data("breast28")
    rgb = imgs.expand(-1, 3, -1, -1).contiguous()
    out = RandAugment(2).expand(rgb, labels, seeds_for(len(rgb), 2))
    assert out.images.shape == (len(rgb), 2, 3, 28, 28) and out.images.dtype == torch.uint8


def test_randaugment_rejects_bad_magnitude() -> None:
    with pytest.raises(ExpansionError):
        RandAugment(1, magnitude=31, num_magnitude_bins=31)


# -- configs ---------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("cutout", Cutout), ("gridmask", GridMask), ("randaugment", RandAugment)])
def test_method_configs_instantiate(name: str, cls) -> None:
    from experiments.training.job import build_expander
    from tests.conftest import compose

    cfg = compose([f"method={name}"]).method
    assert cfg.name == name
    exp = build_expander(cfg)
    assert isinstance(exp, cls) and exp.name == name and exp.ratio == 5
    sig = exp.signature()
    assert sig["method"] == name and "batch_size" not in sig


def test_original_config() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "method" / "original.yaml")
    assert cfg.name == "original" and cfg._target_ is None and cfg.ratio == 0
