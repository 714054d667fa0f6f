"""Per-image seeds: output image ``(parent, copy)`` of a store with seed ``s``
gets its own 63-bit seed, so a result never depends on batch size, batch
order, resumption or the number of devices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014), vectorised over uint64."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def image_seeds(store_seed: int, parents: Sequence[int] | torch.Tensor, ratio: int) -> torch.Tensor:
    """int64 seeds ``[len(parents), ratio]`` for every output image.

    seed(parent, copy) = splitmix64(splitmix64(splitmix64(store_seed) ^ parent) ^ copy) >> 1
    """
    parents_np = np.asarray(parents.cpu().numpy() if isinstance(parents, torch.Tensor) else parents, dtype=np.uint64)
    base = _splitmix64(np.array([store_seed], dtype=np.uint64))
    per_parent = _splitmix64(base ^ parents_np)[:, None]
    copies = np.arange(ratio, dtype=np.uint64)[None, :]
    seeds = _splitmix64(per_parent ^ copies) >> np.uint64(1)
    return torch.from_numpy(seeds.astype(np.int64))


def derive(seeds: torch.Tensor, purpose: str) -> torch.Tensor:
    """Independent per-image seeds for one purpose (e.g. "vae_noise", "prompt"), so the
    several random draws an image needs come from unrelated streams."""
    tag = np.uint64(int.from_bytes(purpose.encode()[:8].ljust(8, b"\0"), "little"))
    flat = seeds.reshape(-1).cpu().numpy().astype(np.uint64)
    mixed = _splitmix64(_splitmix64(flat ^ tag) ^ np.uint64(len(purpose))) >> np.uint64(1)
    return torch.from_numpy(mixed.astype(np.int64)).reshape(seeds.shape)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator seeded with one image seed."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def per_image_rand(
    seeds: torch.Tensor, shape: Sequence[int], *, normal: bool = False, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One independent draw of ``shape`` per seed: returns ``[*seeds.shape, *shape]``.

    Draws happen on the CPU (bitwise reproducible across devices) and are moved
    to ``device`` in one copy. Only the random numbers are drawn per image; the
    work that uses them is batched.
    """
    flat = seeds.reshape(-1).tolist()
    draw = torch.randn if normal else torch.rand
    out = torch.stack([draw(tuple(shape), generator=generator(s)) for s in flat]) if flat else torch.empty(0, *shape)
    return out.reshape(*seeds.shape, *shape).to(device)
