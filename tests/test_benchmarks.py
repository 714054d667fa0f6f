"""benchmarks/gif_sd_throughput.py: the script's logic end to end on the tiny components,
the offline CLIP BPE tokenizer, and the real architecture sizes of expansion/architectures.py (built on the meta device:
no memory, no weights). The real-size timing run is not part of the test suite."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gif_sd_throughput as bench
from expansion.architectures import ARCHITECTURES, RELEASED_PARAMS, clip_tokenizer, n_params
from tests.helpers.benchmarks import run_tiny


@pytest.mark.integration
def test_tiny_run_times_both_modes_of_both_methods(shared_data, tmp_path, capsys):
    report, written = run_tiny(bench, shared_data, tmp_path, "--method", "both", "--ratio", "3", "--steps", "2")
    printed = capsys.readouterr().out
    assert "img/s" in printed and "batched / official" in printed and "TINY" in printed
    assert written["speedup"].keys() == {"gif_sd", "sd_img2img"}
    rows = {(r["method"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(m, mode) for m in ("gif_sd", "sd_img2img") for mode in ("official", "batched")}
    official, batched = rows["gif_sd", "official"], rows["gif_sd", "batched"]
    # official loop: one seed per call, ceil(3/2) = 2 passes of two per seed, float32, criteria per pass
    assert official["seeds_per_call"] == [1, 2] and official["calls_per_repeat"] == 4
    assert official["group_size"] == 2 and official["dtype"] == "float32"
    assert official["images"] == 6 and official["images_generated"] == 8
    # batched: all seeds x k in one call, each seed's k samples scored together (fp32 on CPU)
    assert batched["seeds_per_call"] == [2, 3] and batched["calls_per_repeat"] == 1
    assert batched["group_size"] is None and batched["dtype"] == "float32"
    assert batched["images"] == batched["images_generated"] == 6
    assert batched["output_shape"] == [3, 16, 16]
    assert all(r["images_per_s"] > 0 and r["peak_gpu_gib"] is None for r in report["results"])
    # FLOPs counted over the warm-up call; no MFU without a GPU peak
    assert all(r["flops_per_image"] > 0 and r["achieved_tflops"] > 0 and r["mfu"] is None for r in report["results"])
    assert report["peak_tflops"] is None and "needs a GPU" in report["peak_source"]


def test_breastmnist_seeds_are_one_channel(shared_data):
    images, labels, context = bench.load_seeds(shared_data, "breastmnist", 3)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.uint8
    assert context.channels == 1 and context.prompt_prefix and len(context.class_names) == 2
    images, labels, context = bench.load_seeds(shared_data, "cifar10", 12)
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == [i % 10 for i in range(12)]
    assert len(context.class_names) == 10


def test_offline_clip_bpe_tokenizer_matches_open_clip(tmp_path):
    import open_clip

    tok = clip_tokenizer("real", tmp_path)
    assert len(tok) == 49408 and tok.model_max_length == 77
    prompt = "a real-world photo of colorful automobile"
    ids = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref = open_clip.get_tokenizer("ViT-B-32")([prompt])  # pads with 0, CLIPTokenizer with <|endoftext|>
    n = int((ref[0] != 0).sum())
    assert ids[0, :n].tolist() == ref[0, :n].tolist()
    assert ids.shape == (1, 77)


def test_real_architectures_have_the_released_parameter_counts():
    """expansion/architectures.py's real configs are the released models' (built on the meta device: no
    memory, no weights)."""
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from open_clip.model import CLIP
    from transformers import CLIPTextConfig, CLIPTextModel, ViTMAEConfig, ViTMAEForPreTraining

    real = ARCHITECTURES["real"]
    with torch.device("meta"):
        counts = {
            "sd_unet": n_params(UNet2DConditionModel(**real["sd_unet"])),
            "sd_vae": n_params(AutoencoderKL(**real["sd_vae"])),
            "sd_text": n_params(CLIPTextModel(CLIPTextConfig(vocab_size=49408, **real["sd_text"]))),
            "mae": n_params(ViTMAEForPreTraining(ViTMAEConfig(**real["mae"]))),
            "guide": n_params(CLIP(**open_clip.get_model_config(real["guide_arch"]))),
        }
    assert counts == RELEASED_PARAMS
