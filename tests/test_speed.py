"""The training fast path: the decoded-tensor cache (keys, invalidation, damage, atomic
writes), whole-batch loading, torch.compile in place, epoch timing, background checkpoints,
and a smoke run of the training benchmark. No timing is asserted."""

from __future__ import annotations

import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from experiments.data import tensor_cache
from experiments.data.datamodule import ExpansionDataModule, TensorImages, load_expanded_images, whole_batch
from experiments.data.datasets import build_dataset
from experiments.data.tensor_cache import TensorCache, cache_key, store_source
from experiments.training.classifier import ImageClassifier
from experiments.training.job import Job
from experiments.training.pipeline import build_classifier, run_expansion
from experiments.training.timing import EpochTimer, steady_epoch_seconds
from tests.conftest import job_config


def _cfg(overrides):
    return job_config(overrides)


@pytest.fixture
def digits_store(tmp_path):
    """A finished cutout store of digits (200 images) and the dataset it expands."""
    cfg = _cfg(["dataset=digits", "method=cutout", "method.ratio=1"])
    data = build_dataset(cfg.dataset).in_memory()
    return run_expansion(Job.from_config(cfg), data).expanded, data


def _forbid_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded an image file although its tensor is cached")

    monkeypatch.setattr("experiments.data.datamodule.read_image", refuse)
    monkeypatch.setattr("experiments.data.datasets.core.read_image", refuse)


def _cache_files(folder):
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_key_changes_with_resolution_channels_source_and_version(monkeypatch):
    source = {"kind": "expansion_store", "store_key": "abc", "manifest_rows": "1", "files": "2", "num_images": 3}
    key = cache_key(source, 32, 3)[0]
    assert key == cache_key(dict(source), 32, 3)[0]  # deterministic
    others = [
        cache_key(source, 28, 3)[0],
        cache_key(source, 32, 1)[0],
        cache_key(source, None, 3)[0],
        cache_key({**source, "store_key": "abd"}, 32, 3)[0],
        cache_key({**source, "files": "3"}, 32, 3)[0],
    ]
    assert len({key, *others}) == 6
    monkeypatch.setattr(tensor_cache, "FORMAT_VERSION", tensor_cache.FORMAT_VERSION + 1)
    assert cache_key(source, 32, 3)[0] != key


def test_store_is_decoded_once_then_loaded_from_the_cache(digits_store, tmp_path, monkeypatch):
    expanded, data = digits_store
    tensors = tmp_path / "tensors"
    first = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    assert torch.equal(first, load_expanded_images(expanded, data.channels, data.image_size))  # = uncached decode
    assert len(_cache_files(tensors)) == 1
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        again = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    assert torch.equal(again, first) and again.dtype == torch.uint8
    # another resolution is another entry; the first one stays valid
    bigger = load_expanded_images(expanded, data.channels, 12, tensor_dir=tensors)
    assert bigger.shape[-2:] == (12, 12) and len(_cache_files(tensors)) == 2
    assert not list(tensors.glob("*.tmp-*"))


def test_a_regenerated_store_image_changes_the_key(digits_store, tmp_path):
    """The key follows the image digests the store records (and checks before reuse): a damaged image
    the store regenerates is recorded anew, so its decode is another entry."""
    from expansion.store import ExpansionStore, encode_png

    expanded, data = digits_store
    tensors = tmp_path / "tensors"
    before = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    key = cache_key(store_source(expanded), data.image_size, data.channels)[0]
    meta = json.loads((expanded.root / "meta.json").read_text())
    store = ExpansionStore(expanded.root, meta["key"], meta["payload"])
    store.replace_images({expanded.rows[5]["file"]: encode_png(torch.full((1, 8, 8), 255, dtype=torch.uint8))})
    assert cache_key(store_source(expanded), data.image_size, data.channels)[0] != key
    after = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    assert (after[5] == 255).all() and not torch.equal(after[5], before[5])
    assert torch.equal(after[6:], before[6:]) and len(_cache_files(tensors)) == 2


def test_another_store_with_the_same_files_has_another_key(digits_store, tmp_path):
    import shutil

    from expansion.store import ExpandedSet

    expanded, _ = digits_store
    copy = ExpandedSet(tmp_path / "other_store_key", expanded.rows)
    shutil.copytree(expanded.root / "images", copy.root / "images")
    keys = {cache_key(store_source(s), 8, 1)[0] for s in (expanded, copy)}
    assert len(keys) == 2
    relabelled = ExpandedSet(expanded.root, [{**r, "label": (r["label"] + 1) % 10} for r in expanded.rows])
    assert cache_key(store_source(relabelled), 8, 1)[0] not in keys


def test_a_damaged_cache_file_is_rebuilt_with_a_warning(digits_store, tmp_path, caplog):
    expanded, data = digits_store
    tensors = tmp_path / "tensors"
    good = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    (path,) = tensors.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="experiments.data.tensor_cache"):
        rebuilt = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    assert torch.equal(rebuilt, good)
    assert "unreadable" in caplog.text and path.name in caplog.text
    assert path.stat().st_size > 100  # replaced by a whole file


def test_a_cache_file_with_other_labels_is_stale_and_rebuilt(tmp_path, caplog):
    cache = TensorCache(tmp_path)
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    source = {"kind": "test"}
    cache.get_or_decode(source, 4, 1, [0, 1], lambda: images)
    key, payload = cache_key(source, 4, 1)
    cache.save(key, payload, images, torch.tensor([1, 1]))  # e.g. written by a buggy older writer
    with caplog.at_level(logging.WARNING, logger="experiments.data.tensor_cache"):
        out = cache.get_or_decode(source, 4, 1, [0, 1], lambda: images + 1)
    assert torch.equal(out, images + 1) and "stale" in caplog.text and "labels" in caplog.text


def test_decoded_images_that_do_not_match_the_key_are_refused(tmp_path):
    with pytest.raises(ValueError, match="do not match their cache key: .*8, 8.*expected 4 x 4"):
        TensorCache(tmp_path).get_or_decode(
            {"kind": "test"}, 4, 1, [0], lambda: torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
        )
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 64)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(OSError, match="No space left"):
        TensorCache(tmp_path / "t").get_or_decode({"kind": "test"}, 4, 1, [0, 1], lambda: images)
    assert list((tmp_path / "t").iterdir()) == []


def _image_folder(root, size=10, n=3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )


def test_file_dataset_splits_are_cached_by_resolution(tmp_path, monkeypatch):
    _image_folder(tmp_path / "data")
    tensors = tmp_path / "tensors"
    cfg = _cfg(
        [
            "dataset=imagefolder",
            f"dataset.path={tmp_path / 'data'}",
            "dataset.image_size=8",
            "dataset.val_fraction=0.34",
        ]
    )
    plain = build_dataset(cfg.dataset).in_memory()
    cached = build_dataset(cfg.dataset).in_memory(tensor_dir=tensors)
    assert len(_cache_files(tensors)) == 3  # train, val, test
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        again = build_dataset(cfg.dataset).in_memory(tensor_dir=tensors)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(plain, split).to_tensor(), getattr(cached, split).to_tensor())
        assert torch.equal(getattr(again, split).to_tensor(), getattr(cached, split).to_tensor())
        assert np.array_equal(getattr(again, split).labels, getattr(plain, split).labels)
    assert again.identity == plain.identity
    cfg.dataset.image_size = 6
    six = build_dataset(cfg.dataset).in_memory(tensor_dir=tensors)
    assert six.train.to_tensor().shape[-1] == 6 and len(_cache_files(tensors)) == 6


def test_in_memory_datasets_are_not_copied_into_the_cache(tmp_path):
    build_dataset(_cfg(["dataset=digits"]).dataset).in_memory(tensor_dir=tmp_path / "tensors")
    assert not (tmp_path / "tensors").exists()


def test_pipeline_reuses_the_decoded_store_across_seeds(tmp_path, monkeypatch):
    from experiments.training.pipeline import run

    overrides = [
        "dataset=digits",
        "method=cutout",
        "method.ratio=1",
        "train.epochs=1",
        "expansion_seed=0",
        "quality.enabled=false",
        "logger=none",
        "train.compare_original=false",
    ]
    first = run(_cfg(overrides + ["seed=0"]), tmp_path / "s0")
    tensors = tmp_path / "cache" / "tensors"  # EXPANSION_CACHE is tmp_path/cache (conftest)
    assert len(_cache_files(tensors)) == 1
    _forbid_decoding(monkeypatch)
    second = run(_cfg(overrides + ["seed=1"]), tmp_path / "s1")
    assert second.expansion.key == first.expansion.key and second.expansion.reused
    assert len(second.training.epoch_seconds) == 1 and second.training.epoch_seconds[0] > 0


def test_loader_fetches_whole_batches_in_the_per_sample_order():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    dataset = TensorImages(images, np.arange(10) % 3)
    assert torch.equal(dataset.__getitems__([3, 1])[0], images[[3, 1]])
    batched = torch.utils.data.DataLoader(
        dataset,
        batch_size=4,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=whole_batch,
    )
    per_sample = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(dataset.images, dataset.labels),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    pairs = list(zip(batched, per_sample, strict=True))
    assert len(pairs) == 2
    for (x, y), (x_ref, y_ref) in pairs:
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_datamodule_loaders_yield_stacked_batches():
    data = build_dataset(_cfg(["dataset=digits"]).dataset)
    dm = ExpansionDataModule(data, None, None, recipe="digits", input_size=8, batch_size=64)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (64,)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[0] == len(data.val) and y.dtype == torch.long


def test_compile_in_place_keeps_checkpoint_keys():
    plain = ImageClassifier("small_cnn", 3, 1, 8, lr=0.1)
    compiled = ImageClassifier("small_cnn", 3, 1, 8, lr=0.1, compile="eager")
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    compiled.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compiled.eval()(x), plain.eval()(x), atol=1e-6)


def test_classifier_configs_with_empty_kwargs_build():
    cfg = _cfg(["dataset=breastmnist", "classifier=mobilenet_v2", "train.compile=false"])
    data = build_dataset(cfg.dataset)
    model = build_classifier(Job.from_config(cfg), data)
    assert model.hparams.arch == "mobilenetv2_100" and model.hparams.input_size == 224
    assert model.hparams.channels_last and not model.hparams.compile


def test_epoch_timer_times_every_epoch():
    data = build_dataset(_cfg(["dataset=digits"]).dataset)
    dm = ExpansionDataModule(data, None, None, recipe="digits", input_size=8, batch_size=256)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ImageClassifier("small_cnn", 10, 1, 8, lr=0.05, epochs=3), datamodule=dm)
    assert len(timer.epoch_seconds) == 3 and all(t > 0 for t in timer.epoch_seconds)
    assert steady_epoch_seconds([5.0, 1.0, 3.0]) == 2.0 and steady_epoch_seconds([4.0]) == 4.0


def test_training_benchmark_smoke(shared_data, tmp_path, capsys):
    from benchmarks import training_throughput as bench

    report = bench.main(
        [
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--repeats",
            "1",
            "--cache-dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "framework / bare epoch time" in out and (tmp_path / "t.json").is_file()
    for kind in ("framework", "bare"):
        run = report[kind]["runs"][0]
        assert len(run["epoch_seconds"]) == 2 and report[kind]["images_per_s"] > 0
    assert 0 < report["settings"]["images_per_epoch"] <= report["settings"]["train_images"]
    assert report["ratio_framework_over_bare"] > 0


def test_checkpoints_written_in_the_background_are_whole_when_fit_returns(tmp_path):
    from experiments.training.pipeline import train_and_evaluate

    cfg = _cfg(["dataset=digits", "train.epochs=2", "logger=none"])
    metrics = train_and_evaluate(
        Job.from_config(cfg), build_dataset(cfg.dataset).in_memory(), None, None, tmp_path / "train", False
    )
    checkpoints = tmp_path / "train" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    best = torch.load(checkpoints / "best.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["optimizer_states"]  # the full training state, for resuming
    assert "optimizer_states" not in best and best["state_dict"].keys() == last["state_dict"].keys()
    assert len(metrics.epoch_seconds) == 2 and not list(checkpoints.glob("*.tmp-*"))


# --------------------------------------------------------------------------- generation FLOPs and MFU


def test_flop_counter_counts_cpu_attention_like_cuda_attention():
    import torch.nn.functional as F

    from benchmarks.common import count_flops

    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    _, flops = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert flops == 4 * 2 * 4 * 16 * 16 * 8  # QK^T and PV: 2 matmuls of 2 b h s s d FLOPs
    _, with_backward = count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert with_backward == flops * 7 // 2  # backward = 2.5 x forward


def test_gpu_peak_lookup_and_utilisation(monkeypatch):
    from benchmarks.common import gpu_peak_tflops, utilisation

    assert gpu_peak_tflops(torch.device("cpu"))[0] is None
    assert gpu_peak_tflops(torch.device("cpu"), override=100.0) == (100.0, "--peak-tflops")
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Some Future GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_peak_tflops(torch.device("cuda"))[0] == peak, name
    assert utilisation(2e12, 10.0, 100.0) == {"achieved_tflops": 20.0, "mfu": 0.2}
    assert utilisation(2e12, 10.0, None)["mfu"] is None and utilisation(None, 1.0, 100.0)["mfu"] is None


def test_closed_set_benchmark_counts_the_unet_work_per_image(shared_data, tmp_path, capsys):
    from benchmarks import closed_set_throughput as bench
    from benchmarks.common import count_flops

    report = bench.main(
        [
            "--device",
            "cpu",
            "--unet",
            "tiny",
            "--steps",
            "2",
            "--ratio",
            "1",
            "--seeds-per-pass",
            "2",
            "--fit-steps",
            "1",
            "--fit-batch",
            "2",
            "--data",
            str(shared_data),
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert "batched / per-seed" in capsys.readouterr().out and (tmp_path / "c.json").is_file()
    per_seed, batched = report["results"]
    assert per_seed["seeds_per_call"] == [1, 1] and per_seed["calls_per_repeat"] == 2
    assert batched["seeds_per_call"] == [2, 1] and batched["calls_per_repeat"] == 1
    assert batched["output_shape"] == [3, 32, 32] and batched["mfu"] is None  # no GPU peak on a CPU
    # per image: one UNet forward per sampling step, the same in both modes
    from expansion.closed_set_diffusion import build_unet, unet_spec

    unet = build_unet(unet_spec("tiny"), channels=3, resolution=32, num_classes=10, null_class=False, seed=0)
    with torch.no_grad():
        _, one_forward = count_flops(lambda: unet(torch.randn(1, 3, 32, 32), 10, class_labels=torch.tensor([1])))
    for row in (per_seed, batched):
        assert row["flops_per_image"] == pytest.approx(2 * one_forward, rel=1e-6)
        assert row["achieved_tflops"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / 1e12)
    fit = report["fit"]
    assert fit["batch_size"] == 2 and fit["seconds_per_step"] > 0
    assert fit["flops_per_step"] == pytest.approx(3 * 2 * one_forward, rel=0.02)  # forward + backward ~ 3 forwards


# --------------------------------------------------------------------------- the cost table


@pytest.mark.integration
def test_cost_table_multiplies_measured_rates_over_the_sweep_grid(tmp_path):
    import json

    from experiments.tools import cost_table

    measurements = tmp_path / "m"
    measurements.mkdir()
    (measurements / "training_cpu.json").write_text(
        json.dumps(
            {
                "benchmark": "training",
                "device": "cpu",
                "machine": "test CPU",
                "date": "2026-11-29",
                "settings": {
                    "arch": "small_cnn",
                    "input_size": 8,
                    "channels": 1,
                    "batch_size": 64,
                    "precision": "32-true",
                    "dataset": "digits",
                },
                "framework": {"images_per_s": 1000.0},
            }
        )
    )
    out = tmp_path / "cost.md"
    costs = cost_table.main(["--measurements", str(measurements), "--tables", "digits_baselines", "--out", str(out)])
    cost = costs["digits_baselines"]
    n_train = len(build_dataset(_cfg(["dataset=digits"]).dataset).train)
    per_method = {
        m: _cfg(["experiment=digits_baselines", f"method={m}"]) for m in ("cutout", "gridmask", "randaugment")
    }
    epochs = int(per_method["cutout"].train.epochs)
    ratios = [int(c.method.ratio) for c in per_method.values()]
    assert cost["jobs"] == 12 and cost["cells"] == 4 and cost["device"] == "cpu"
    assert cost["image_epochs"] == 3 * epochs * (n_train + sum(n_train * (1 + r) for r in ratios))
    assert cost["generated_images"] == 3 * sum(n_train * r for r in ratios)  # expansion_seed follows seed
    (training,) = cost["parts"]["training"].values()
    assert training["kind"] == "measured" and training["hours"] == pytest.approx(cost["image_epochs"] / 1000 / 3600)
    assert {e["kind"] for e in cost["parts"]["generation"].values()} == {"measured"}  # baselines are timed on the CPU
    text = out.read_text()
    assert "| digits_baselines | cpu | 12 (4 x 3) |" in text and "training_cpu.json: test CPU, 2026-11-29" in text
    # the same rate at another batch size is an estimate, never a measurement
    other_batch = json.loads((measurements / "training_cpu.json").read_text())
    other_batch["settings"]["batch_size"] = 256
    (measurements / "training_cpu.json").write_text(json.dumps(other_batch))
    (training,) = cost_table.main(["--measurements", str(measurements), "--tables", "digits_baselines"])[
        "digits_baselines"
    ]["parts"]["training"].values()
    assert training["kind"] == "estimate"


def test_tensor_cache_benchmark_writes_the_cache_before_timing():
    from benchmarks.tensor_cache_speed import compare

    calls = []
    row = compare("fake", 3, lambda: calls.append("decode"), lambda: calls.append("load"), repeats=2)
    assert calls == ["load", "decode", "load", "decode", "load"]  # untimed first load, then interleaved
    assert row["images"] == 3 and len(row["seconds"]["decode"]) == 2 and row["speedup"] > 0
