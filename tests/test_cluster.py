"""The cluster side: launcher=slurm composes into the sbatch file submitit would submit, and
logger=wandb groups a multirun's jobs into one W&B group with one finished run per job."""

from __future__ import annotations

import glob
import os
import struct
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import compose
from tests.helpers.cli import run_py

SLURM = [
    "launcher=slurm",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.account=my_lab",
    "hydra.launcher.timeout_min=240",
    "hydra.launcher.cpus_per_task=6",
    "hydra.launcher.mem_gb=48",
    "hydra.launcher.array_parallelism=5",
    'hydra.launcher.setup=["module load cuda/12.1","source .venv/bin/activate"]',
]


def test_slurm_launcher_composes_with_its_parameters():
    cfg = compose(SLURM)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu", "my_lab", 240)
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.array_parallelism) == (6, 48, 5)
    assert list(launcher.setup) == ["module load cuda/12.1", "source .venv/bin/activate"]
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.nodes == 1  # one GPU per job
    assert launcher.max_num_timeout >= 1 and launcher.signal_delay_s >= 60
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert compose(SLURM + ["trainer=cpu"]).hydra.launcher.gpus_per_node is None  # sbatch asks for no GPU
    multi = compose(SLURM + ["trainer=ddp", "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4"])
    assert multi.trainer.strategy == "ddp" and multi.hydra.launcher.tasks_per_node == 4


def test_slurm_launcher_writes_the_expected_sbatch_array(tmp_path, monkeypatch):
    """The real plugin and submitit, up to the sbatch call: the submission file of a 3-job sweep."""
    import submitit.slurm.slurm as slurm

    class Submitted(Exception):
        pass

    captured = {}

    def submit(self, command):
        captured["sbatch"] = self._make_submission_file_text(command, "uid")
        raise Submitted

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    monkeypatch.setattr(slurm.SlurmExecutor, "_submit_command", submit)
    cfg = compose(SLURM + [f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Submitted):
        launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0)
    sbatch = captured["sbatch"].splitlines()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my_lab",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=48GB",
        "#SBATCH --time=240",
        "#SBATCH --array=0-2%3",
        "#SBATCH --signal=USR2@120",
        "module load cuda/12.1",
        "source .venv/bin/activate",
    ):
        assert line in sbatch, f"{line!r} not in:\n" + "\n".join(sbatch)
    assert str(tmp_path / "sweep" / ".submitit") in captured["sbatch"]


# ---------------------------------------------------------------- W&B


def _wandb_records(path: Path):
    """The records of an offline ``run-<id>.wandb`` file (W&B's LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        pending += data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            break
        if kind in (1, 4):  # FULL or LAST fragment: one complete record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.integration
def test_wandb_offline_multirun_groups_jobs_and_finishes_every_run(tmp_path):
    """Two jobs, two W&B runs: same group (the sweep), their own job type and tags, each with its
    exit record; the expansion job logged its grid and manifest table; the API key from the
    environment appears in no file of the sweep."""
    sweep, key = tmp_path / "sweep", "0123456789abcdef0123456789abcdef01234567"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": key,
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "PROGRESS_BAR": "false",
    }
    args = ["-m", "dataset=digits", "method=original,cutout", "method.ratio=1", "train.epochs=1"]
    proc = run_py([*args, "quality.enabled=false", "logger=wandb", f"hydra.sweep.dir={sweep}"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for path in sorted(glob.glob(str(sweep / "*" / "wandb" / "offline-run-*" / "run-*.wandb"))):
        records = list(_wandb_records(Path(path)))
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        runs[info.run_id] = {
            "group": info.run_group,
            "job_type": info.job_type,
            "tags": list(info.tags),
            "exits": exits,
            "dir": Path(path).parent,
        }
    assert len(runs) == 2
    assert all(r["exits"] == [0] for r in runs.values())  # both finished, neither reused
    assert {r["group"] for r in runs.values()} == {f"adhoc-{sweep.parent.name}_{sweep.name}"}
    by_type = {r["job_type"]: r for r in runs.values()}
    assert set(by_type) == {"train", "expand"}
    assert by_type["train"]["tags"] == ["digits", "original", "small_cnn"]
    assert by_type["expand"]["tags"] == ["digits", "cutout", "small_cnn"]
    media = by_type["expand"]["dir"] / "files" / "media"
    assert list(media.glob("images/expansion/grid_*.png")) and list(media.glob("table/expansion/manifest_*.table.json"))
    leaked = [
        p
        for root in (sweep, tmp_path / "wandb", tmp_path / "wandb_data")
        if root.exists()
        for p in root.rglob("*")
        if p.is_file() and key.encode() in p.read_bytes()
    ]
    assert leaked == []
