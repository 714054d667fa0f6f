"""A tiny open_clip model (ViT + text transformer, random weights) registered under its own
architecture name and saved as a local weights file, so the real loading path
(``open_clip.create_model_and_transforms(arch, pretrained=<file>)``) runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(tmp_dir: Path, seed: int = 0, name: str = "tiny-test-clip") -> dict:
    """Returns the guide spec {kind, arch, pretrained, model_config} for the saved model."""
    import open_clip
    from safetensors.torch import save_file

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / f"{name}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(config_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    weights = tmp_dir / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"kind": "clip", "arch": name, "pretrained": str(weights), "model_config": str(config_path)}
