"""expansion_grid.png: each seed image (left) followed by its expansions, a few seeds per class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .extractors import QualityError


def grid_parents(labels: Sequence[int] | np.ndarray, parents: Sequence[int], rows: int) -> list[int]:
    """``rows`` seed indices, round-robin over the classes (the first seed of each class,
    then the second, ...), among seeds that have expansions; deterministic."""
    labels = np.asarray(labels)
    have = sorted({int(p) for p in parents})
    by_class: dict[int, list[int]] = {}
    for p in have:
        by_class.setdefault(int(labels[p]), []).append(p)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < rows and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(chosen) < rows:
                chosen.append(by_class[c][depth])
        depth += 1
    return chosen


def save_expansion_grid(
    path: Path | str,
    original: torch.Tensor,
    original_labels,
    expanded: torch.Tensor,
    parents: Sequence[int],
    copies: Sequence[int],
    *,
    rows: int = 8,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """PNG grid: one row per seed image (first column), then its k expansions in copy order."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    parents = np.asarray(parents)
    copies = np.asarray(copies)
    chosen = grid_parents(original_labels, parents, rows)
    if not chosen:
        raise QualityError("no seed image has expansions: nothing to draw")
    k = int(max((parents == p).sum() for p in chosen))
    c, h, w = original.shape[1:]
    scale = max(1, math.ceil(48 / max(h, w)))
    ch, cw = h * scale, w * scale
    gap, sep, margin, header = 2, 8, 90, 16 + (16 if title else 0)
    width = margin + cw + sep + k * (cw + gap)
    height = header + len(chosen) * (ch + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    draw.text((margin, header - 14), "seed", fill="black", font=font)
    draw.text((margin + cw + sep, header - 14), f"its {k} expansions", fill="black", font=font)

    def tile(img: torch.Tensor) -> Image.Image:
        arr = img.numpy()
        arr = arr[0] if c == 1 else arr.transpose(1, 2, 0)
        im = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        return im.resize((cw, ch), Image.NEAREST)

    labels = np.asarray(original_labels)
    for r, p in enumerate(chosen):
        y = header + r * (ch + gap)
        name = class_names[int(labels[p])] if class_names else str(int(labels[p]))
        draw.text((4, y + ch // 2 - 13), str(name)[:14], fill="black", font=font)
        draw.text((4, y + ch // 2 + 1), f"train #{p}", fill="gray", font=font)
        canvas.paste(tile(original[p]), (margin, y))
        idx = np.flatnonzero(parents == p)
        idx = idx[np.argsort(copies[idx], kind="stable")]
        for j, i in enumerate(idx):
            canvas.paste(tile(expanded[i]), (margin + cw + sep + j * (cw + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
