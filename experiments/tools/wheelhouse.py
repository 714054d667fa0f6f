"""The offline bundle for a GPU node that has a PyTorch image and no network.

    make wheelhouse [WHEELHOUSE=dist/wheelhouse] [PY=3.12] [PLATFORMS="manylinux_2_28_x86_64 ..."]
    python experiments/tools/wheelhouse.py check dist/wheelhouse    # install it into an empty folder, run the smoke

``build`` downloads, on a machine with package access, the wheels the node lacks (for the target
Python version and platform) at the versions installed here, builds the project's own wheel,
copies the benchmarks' seed data (BreastMNIST, 0.5 MB) into ``data/``, writes ``MANIFEST.json``
and prints the bundle's size. On the node, beside the checkout::

    python3 -m pip install --no-index --no-deps --no-compile --target /tmp/site <bundle>/*.whl
    export PYTHONPATH=/tmp/site
    make benchmark-gpu-quick PYTHON=python3 OUT=<folder> DATA=<bundle>/data

What the node lacks is everything the benchmarks need (:data:`BENCHMARK_NEEDS` and what they
require, as installed here) less what the node's image holds (:data:`NODE_IMAGE` and what those
require). wandb, submitit, POT, medmnist and datasets are imported lazily by the project, so the
benchmarks never need them and the bundle leaves them out.

``check`` proves the install path here: a clean interpreter (a fresh venv without site packages)
sees only the node image's packages (linked from this environment) and the bundle installed into
an empty folder; the project must import from that folder, the optional packages must be absent,
and ``experiments/tools/gpu_quick.py --device cpu --smoke`` must finish.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from expansion.files import atomic_directory

#: the target node's preinstalled Python packages (a CUDA PyTorch image, issue 22)
NODE_IMAGE = (
    "torch",
    "torchvision",
    "lightning",
    "pytorch-lightning",
    "timm",
    "transformers",
    "accelerate",
    "huggingface-hub",
    "safetensors",
    "torchmetrics",
    "networkx",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "pillow",
    "pandas",
    "numpy",
    "pyyaml",
    "tqdm",
    "pytest",
)
#: what the benchmarks and the project's core import beyond the image
BENCHMARK_NEEDS = ("diffusers", "open-clip-torch", "hydra-core", "omegaconf")
#: imported lazily, never by a benchmark: not in the bundle (distribution -> module)
OPTIONAL = {"wandb": "wandb", "submitit": "submitit", "pot": "ot", "medmnist": "medmnist", "datasets": "datasets"}
DEFAULT_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
SIZE_LIMIT_MB = 60.0
SEED_DATA = Path("medmnist") / "breastmnist.npz"


def requirement_closure(roots: tuple[str, ...], python_version: str) -> dict[str, str]:
    """Each distribution ``roots`` need (themselves included) -> its version installed here; requirement
    markers evaluated for ``python_version`` on Linux, extras not followed. Roots not installed here are
    left out (the node has them; nothing here can say what they need)."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    found: dict[str, str] = {}
    stack = [canonicalize_name(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                stack.append(canonicalize_name(req.name))
    return found


def bundle_requirements(python_version: str) -> dict[str, str]:
    """What the node lacks: the benchmarks' closure less the image's closure (and the project itself)."""
    image = requirement_closure(NODE_IMAGE, python_version)
    needs = requirement_closure(BENCHMARK_NEEDS, python_version)
    missing = [n for n in BENCHMARK_NEEDS if canonicalize_name(n) not in needs]
    if missing:
        raise SystemExit(f"not installed here: {', '.join(missing)}; run `make install` first")
    optional = sorted(set(needs) & set(OPTIONAL))
    if optional:
        raise SystemExit(f"the benchmarks' requirements pull in optional packages {optional}: make them lazy")
    return {name: version for name, version in sorted(needs.items()) if name not in image}


def _pip(*args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    """pip with ``args``; ``quiet``: its output captured (returned), not printed, and no error raised."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, check=not quiet, capture_output=quiet, text=True)


def _supported(wheel: Path, python_version: str, platforms: tuple[str, ...]) -> bool:
    """A wheel CPython ``python_version`` on one of ``platforms`` installs (packaging's tag lists, as pip's)."""
    version = tuple(int(x) for x in python_version.split(".")[:2])
    accepted = {*cpython_tags(version, platforms=platforms), *compatible_tags(version, platforms=platforms)}
    *_, tags = parse_wheel_filename(wheel.name)
    return not accepted.isdisjoint(tags)


def download(requirements: dict[str, str], out: Path, python_version: str, platforms: tuple[str, ...]) -> None:
    """Binary wheels for the target; a distribution published as a source archive only (e.g.
    antlr4-python3-runtime) is built here and accepted only if the wheel is pure Python."""
    target = ["--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        target += ["--platform", platform]
    for name, version in requirements.items():
        pinned = f"{name}=={version}"
        got = _pip("download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(out), pinned, quiet=True)
        if got.returncode != 0:
            print(f"wheelhouse: no binary wheel of {pinned} for the target; building it from source here")
            built = _pip("wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(out), pinned, quiet=True)
            if built.returncode != 0:
                raise SystemExit(
                    f"{pinned}: neither a wheel for the target nor a source build:\n{got.stderr}{built.stderr}"
                )
    for wheel in out.glob("*.whl"):
        if not _supported(wheel, python_version, platforms):
            raise SystemExit(f"{wheel.name} does not install on CPython {python_version} {platforms}: delete it")


def project_wheel(out: Path) -> None:
    """The project's wheel, built from a copy of its sources (no build/ or egg-info in the checkout)."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse_src_") as tmp:
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (ROOT / name).is_file():
                shutil.copy2(ROOT / name, tmp)
        for package in ("expansion", "baselines", "experiments"):
            shutil.copytree(ROOT / package, Path(tmp) / package, ignore=shutil.ignore_patterns("__pycache__"))
        _pip("wheel", "-q", "--no-deps", "-w", str(out), tmp)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, python_version: str, platforms: tuple[str, ...], data: Path) -> dict:
    """Write the bundle into ``out`` (a folder filled beside it and swapped in whole at the end, so a
    failed or oversized build leaves nothing; an older bundle there is replaced); returns its manifest."""
    seed = data / SEED_DATA
    if not seed.is_file():
        raise SystemExit(f"{seed} not found: pass --data <the shared data folder>")
    if out.exists() and any(out.iterdir()) and not (out / "MANIFEST.json").is_file():
        raise SystemExit(f"{out} is not empty and holds no bundle (no MANIFEST.json): pass another --out")
    requirements = bundle_requirements(python_version)
    with atomic_directory(out) as tmp:
        return _fill(tmp, out, requirements, python_version, platforms, seed)


def _fill(out: Path, final: Path, requirements: dict[str, str], python_version: str, platforms, seed: Path) -> dict:
    download(requirements, out, python_version, platforms)
    project_wheel(out)
    (out / "data" / SEED_DATA.parent).mkdir(parents=True)
    shutil.copy2(seed, out / "data" / SEED_DATA)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "python_version": python_version,
        "platforms": list(platforms),
        "node_image": list(NODE_IMAGE),
        "requirements": requirements,
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        "install": "python3 -m pip install --no-index --no-deps --no-compile --target /tmp/site <bundle>/*.whl",
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    manifest["size_mb"] = size_mb
    if size_mb > SIZE_LIMIT_MB:
        raise SystemExit(f"the bundle is {size_mb:.1f} MB, over the {SIZE_LIMIT_MB:.0f} MB a node's slot allows")
    print(
        f"wheelhouse: {len([p for p in files if p.suffix == '.whl'])} wheels + seed data for CPython {python_version} "
        f"({platforms[0]}), {size_mb:.1f} MB in {final}"
    )
    return manifest


def install(bundle: Path, target: Path) -> None:
    """What the node runs: the bundle's wheels into ``target``, without network or dependency resolution."""
    wheels = sorted(str(p) for p in bundle.glob("*.whl"))
    if not wheels or not (bundle / "MANIFEST.json").is_file():
        raise SystemExit(f"{bundle} is no bundle (no wheels or no MANIFEST.json): build it with `make wheelhouse`")
    _pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(target), *wheels)


def node_site(folder: Path, python_version: str) -> None:
    """The node image's packages, linked from this environment into ``folder`` (top-level entries of
    each distribution in the image's closure, metadata included)."""
    folder.mkdir(parents=True)
    for name in requirement_closure(NODE_IMAGE, python_version):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {".."}:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


def check(bundle: Path, work: Path, data: Path) -> subprocess.CompletedProcess:
    """Install ``bundle`` into an empty folder and run the smoke on a clean interpreter that sees only
    the node image and that folder; raises if the project does not come from the bundle."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    clean, site, image = work / "clean-python", work / "site", work / "node-image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clean)], check=True)
    python = str(clean / "bin" / "python")
    node_site(image, version)
    install(bundle, site)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{image}"
    optional = sorted(OPTIONAL.values())
    probe = (
        "import importlib.util, json, sys\n"
        "import expansion, experiments, baselines, diffusers, open_clip, hydra, omegaconf\n"
        "present = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]\n"
        "print(json.dumps({'project': expansion.__file__, 'present': present}))"
    )
    done = subprocess.run([python, "-c", probe, *optional], cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"the bundle installed on a clean Python does not import the project: {last}")
    found = json.loads(done.stdout)
    if not Path(found["project"]).resolve().is_relative_to(site.resolve()):
        raise SystemExit(f"the project was imported from {found['project']}, not from the bundle in {site}")
    if found["present"]:
        raise SystemExit(f"the clean interpreter sees optional packages {found['present']}: not a node")
    print(f"wheelhouse check: the project imports from {site}; absent as on the node: {', '.join(optional)}")
    return subprocess.run(
        [python, str(ROOT / "experiments" / "tools" / "gpu_quick.py"), "--device", "cpu", "--smoke"]
        + ["--out", str(work / "smoke"), "--data", str(data)],
        cwd=ROOT,
        env=env,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the wheels the node lacks and build the bundle")
    b.add_argument("--out", type=Path, default=ROOT / "dist" / "wheelhouse")
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--platform", nargs="+", default=list(DEFAULT_PLATFORMS))
    c = sub.add_parser("check", help="install the bundle into an empty folder and run the smoke on a clean Python")
    c.add_argument("bundle", type=Path)
    for q in (b, c):
        q.add_argument(
            "--data",
            type=Path,
            default=Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")),
            help="the shared data folder (medmnist/breastmnist.npz)",
        )
    args = p.parse_args(argv)
    if args.command == "build":
        build(args.out, args.python_version, tuple(args.platform), args.data)
        return 0
    with tempfile.TemporaryDirectory(prefix="wheelhouse_check_") as tmp:
        return check(args.bundle, Path(tmp), args.data).returncode


if __name__ == "__main__":
    sys.exit(main())
