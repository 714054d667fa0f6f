"""Expansive Synthesis (arXiv 2406.17238) as an expansion method.

Fit stage (cached by key): the convolutional autoencoder with spatial self-attention,
pretrained on an auxiliary pool and fine-tuned on the small set (:mod:`.fitting`); the latent
features ``y_i`` of every training image; one d-regular expander graph per class over its
samples (:mod:`.graph`); the Koopman operator ``K`` fitted on the graph's edges with the
optimal-transport regulariser (:mod:`.koopman`).

Generation, output image ``(i, c)`` (seed i, copy c), every random draw from its own seed:

1. neighbour ``j = N(i)[c mod deg(i)]`` (the graph neighbours of i in index order, so the k
   copies of a seed walk over all its edges before reusing one);
2. ``t ~ U(mix_range)``, ``y_mix = (1 - t) y_i + t y_j`` (feature interpolation along the edge;
   ``t <= 0.5`` keeps the seed the nearer parent);
3. ``y_new = y_mix + tau (K y_mix - y_mix)`` (a fraction of one Koopman step);
4. decode ``y_new``; the image takes the seed's label.

The manifest records ``parents`` (``[i, j]``, the graph neighbours combined), ``neighbour``
and ``mix_weight`` (t). Defaults and why: degree 4 (the smallest even degree whose random
regular graphs are good expanders -- d = 3 graphs exist only for an even number of nodes);
``mix_range`` (0.1, 0.5) (never a copy of the seed, never closer to the neighbour);
``tau`` 0.5; OT by the sliced 2-Wasserstein distance (fresh projections every step: as a
training loss it is as faithful as Sinkhorn here and far cheaper; ``sinkhorn`` and ``emd`` are
options; ``sinkhorn`` costs ~40x more CPU time per fit), weight 1, dynamics weight 0.1 (see
:mod:`.koopman` for why); Koopman rank 16 (a low-rank correction ``I + U V^T``: the stochastic
OT gradients would otherwise spread noise over all m^2 entries of a full matrix; rank 16 gave
the lowest held-out OT on MNIST 10/class among full, rank 16, lr 1e-3/1e-4); 8 latent channels at
1/4 of the image side and 4 attention heads over 1 x 1 latent patches; the fine-tuning
classifier weight 0.01 (at 0.1 its cross-entropy outweighed the reconstruction error and
fine-tuning made reconstructions worse). Sensitivity to these is measured
in docs/results.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..base import Expander, ExpansionContext, ExpansionError, ExpansionOutput, ImageSet, to_uint8, train_tensors
from ..files import atomic_file, atomic_write_text
from ..seeding import derive, per_image_rand
from .autoencoder import AutoencoderSpec, to_unit
from .fitting import AutoencoderFit, fitted_autoencoder
from .graph import build_expander_graph
from .koopman import KoopmanOperator, fit_koopman
from .transport import KINDS as OT_KINDS


@dataclass(frozen=True)
class GraphSettings:
    """One expander graph per class: ``random_regular`` of ``degree`` (redrawn up to ``tries``
    times until Ramanujan) or ``complete``."""

    family: str = "random_regular"
    degree: int = 4
    tries: int = 20

    def __post_init__(self) -> None:
        build_expander_graph(self.degree + 2, self.degree, 0, self.family, tries=1)  # checks family and degree


@dataclass(frozen=True)
class KoopmanSettings:
    """The Koopman operator ``K = I + U V^T`` of ``rank`` (None: a full ``K``), fitted ``steps`` steps
    at ``lr``; ``y_new = y_mix + tau (K y_mix - y_mix)``; ``dynamics_weight``: ``|K y_i - y_j|^2``
    over the graph's edges, relative to K = I; ``identity_weight``: the ridge ``|K - I|_F^2 / m``."""

    rank: int | None = 16
    steps: int = 200
    lr: float = 1e-3
    tau: float = 0.5
    dynamics_weight: float = 0.1
    identity_weight: float = 0.1


@dataclass(frozen=True)
class OTSettings:
    """The optimal-transport regulariser between expanded and original latents per class: ``sliced``
    (2-Wasserstein, fresh projections every step), ``sinkhorn`` (debiased, ~40x slower) or ``emd``;
    ``weight`` relative to its value at K = I; ``blur``: entropic regularisation / mean cost."""

    kind: str = "sliced"
    weight: float = 1.0
    blur: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in OT_KINDS:
            raise ExpansionError(f"ot.kind must be one of {OT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class ExpansiveSynthesisSettings(AutoencoderFit):
    """The autoencoder fit (:class:`~.fitting.AutoencoderFit`), the graphs, the Koopman operator, the
    OT regulariser and ``mix_range``: ``t ~ U(lo, hi)``, ``y_mix = (1 - t) y_seed + t y_neighbour``."""

    graph: GraphSettings = field(default_factory=GraphSettings)
    koopman: KoopmanSettings = field(default_factory=KoopmanSettings)
    ot: OTSettings = field(default_factory=OTSettings)
    mix_range: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        lo_hi = self.mix_range
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ExpansionError(f"mix_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(lo_hi)}")


class AutoencoderMethod(Expander):
    """What the methods built on the Expansive Synthesis autoencoder share: the cached pretrain /
    fine-tune fit (:func:`.fitting.fitted_autoencoder`) of ``settings`` (an :class:`AutoencoderFit`)."""

    needs_fit = True

    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        size = context.image_size
        if not size:
            raise ExpansionError(f"{self.name} needs dataset.image_size (the autoencoder's input side)")
        self.spec = AutoencoderSpec(
            channels=context.channels, image_size=int(size), **asdict(self.settings.autoencoder)
        )

    def autoencoder_fit_signature(self) -> dict[str, Any]:
        s = self.settings
        return {
            "autoencoder": asdict(s.autoencoder),
            "pretrain": asdict(s.pretrain),
            "finetune": asdict(s.finetune),
            "fit_seed": s.fit_seed,
        }

    def fit_autoencoder(self, train: ImageSet, artifact_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit (or load) the autoencoder; returns the training images and labels."""
        images, labels = train_tensors(train)
        s = self.settings
        self.autoencoder, self.autoencoder_report = fitted_autoencoder(
            images,
            labels,
            len(self.context.class_names),
            self.spec,
            s.pretrain,
            s.finetune,
            self.context.auxiliary,
            artifact_dir.parent,
            train.fingerprint(),
            seed=s.fit_seed,
        )
        self.autoencoder.requires_grad_(False)
        return images, labels

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> latent features ``[B, c, S/4, S/4]``."""
        return self.autoencoder.features(to_unit(images, self.spec))


class ExpansiveSynthesis(AutoencoderMethod):
    name = "expansive_synthesis"
    settings_class = ExpansiveSynthesisSettings
    wants_parents = True

    def __init__(self, ratio: int, **settings: Any):
        super().__init__(ratio, **settings)
        self.koopman = None

    def fit_signature(self) -> dict[str, Any]:
        s = self.settings
        return {
            "kind": self.name,
            **self.autoencoder_fit_signature(),
            "graph": asdict(s.graph),
            "koopman": asdict(s.koopman),
            "ot": asdict(s.ot),
            "mix_range": list(s.mix_range),
        }

    # -- fit ------------------------------------------------------------------------------
    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        images, labels = self.fit_autoencoder(train, artifact_dir)
        self.register_buffer("train_images", images, persistent=False)
        with torch.no_grad():
            feats = torch.cat([self.features(images[s : s + 512]) for s in range(0, len(images), 512)])
        self.latent_shape = tuple(feats.shape[1:])
        self.register_buffer("train_features", feats.flatten(1), persistent=False)
        graph_file, koopman_file = artifact_dir / "graphs.json", artifact_dir / "koopman.safetensors"
        if graph_file.is_file() and koopman_file.is_file():
            graphs = json.loads(graph_file.read_text())
            self.koopman = KoopmanOperator(feats[0].numel(), self.settings.koopman.rank)
            self.koopman.load_state_dict(load_file(str(koopman_file)))
        else:
            graphs = self._build_graphs(labels)
            self.koopman, report = self._fit_koopman(labels, graphs["neighbours"])
            with atomic_file(koopman_file) as tmp:
                save_file({k: v.contiguous() for k, v in self.koopman.state_dict().items()}, str(tmp))
            atomic_write_text(
                artifact_dir / "fit_report.json",
                json.dumps(
                    {
                        "autoencoder": self.autoencoder_report,
                        "koopman": report,
                        "graphs": {k: v for k, v in graphs.items() if k != "neighbours"},
                    },
                    indent=2,
                ),
            )
            atomic_write_text(graph_file, json.dumps(graphs))  # last: its presence marks a complete fit
        self.koopman.requires_grad_(False)
        self.neighbours = graphs["neighbours"]
        width = max(len(n) for n in self.neighbours)
        table = torch.tensor([n + [-1] * (width - len(n)) for n in self.neighbours], dtype=torch.long)
        self.register_buffer("neighbour_table", table, persistent=False)  # [N, max degree], -1 padded
        self.register_buffer("neighbour_degree", torch.tensor([len(n) for n in self.neighbours]), persistent=False)
        self.graph_info = {k: v for k, v in graphs.items() if k != "neighbours"}

    def _build_graphs(self, labels: torch.Tensor) -> dict[str, Any]:
        """One expander graph per class, as global neighbour lists + per-class spectra."""
        g = self.settings.graph
        neighbours: list[list[int] | None] = [None] * len(labels)
        per_class = {}
        for c in range(len(self.context.class_names)):
            members = torch.nonzero(labels == c).flatten().tolist()
            if not members:
                continue
            if len(members) < 2:
                raise ExpansionError(
                    f"{self.name}: class {c} ({self.context.class_names[c]!r}) has "
                    f"{len(members)} training image; combining neighbours needs at least 2"
                )
            graph = build_expander_graph(len(members), g.degree, self.settings.fit_seed * 7919 + c, g.family, g.tries)
            for local, nbrs in enumerate(graph.neighbours):
                neighbours[members[local]] = [members[n] for n in nbrs]
            per_class[self.context.class_names[c]] = {
                "nodes": len(members),
                "degree": graph.degree,
                "spectral_gap": round(graph.spectral_gap, 6),
                "second_eigenvalue": round(graph.second_eigenvalue, 6),
                "ramanujan": graph.ramanujan,
            }
        return {"neighbours": neighbours, "per_class": per_class}

    def _fit_koopman(self, labels: torch.Tensor, neighbours: list[list[int]]):
        s = self.settings
        k, ot = s.koopman, s.ot
        fit = fit_koopman(
            self.train_features.cpu(),
            labels,
            neighbours,
            rank=k.rank,
            steps=k.steps,
            lr=k.lr,
            tau=k.tau,
            mix_range=tuple(s.mix_range),
            dynamics_weight=k.dynamics_weight,
            identity_weight=k.identity_weight,
            ot_weight=ot.weight,
            ot_kind=ot.kind,
            ot_blur=ot.blur,
            seed=s.fit_seed,
        )
        report = {
            "ot_identity": fit.ot_identity,
            "ot_fitted": fit.ot_fitted,
            "dynamics_identity": fit.dynamics_identity,
            "dynamics_fitted": fit.dynamics_fitted,
            "loss_first": fit.losses[0] if fit.losses else None,
            "loss_last": fit.losses[-1] if fit.losses else None,
        }
        return fit.operator, report

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def new_latents(
        self, parents: torch.Tensor, seeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-3 of the module doc: ``(y_new [B*k, m], neighbour [B, k], t [B, k])``."""
        if self.koopman is None:
            raise ExpansionError(f"{self.name}: fit() has not run")
        b, k = seeds.shape
        device = self.train_features.device
        parents = parents.to(device)
        degree = self.neighbour_degree[parents][:, None]
        neighbour = self.neighbour_table[parents[:, None], torch.arange(k, device=device)[None] % degree]
        lo, hi = self.settings.mix_range
        t = lo + (hi - lo) * per_image_rand(derive(seeds, "es_mix"), (), device=device)  # [B, k]
        y_i = self.train_features[parents][:, None].expand(b, k, -1)
        y_mix = (1 - t[..., None]) * y_i + t[..., None] * self.train_features[neighbour]
        y_new = self.koopman.step(y_mix.reshape(b * k, -1), self.settings.koopman.tau)
        return y_new, neighbour, t

    @torch.no_grad()
    def expand(
        self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor, parents: torch.Tensor | None = None
    ) -> ExpansionOutput:
        if parents is None:
            raise ExpansionError(f"{self.name}.expand needs the seeds' training indices (parents)")
        if not torch.equal(images.cpu(), self.train_images[parents.to(self.train_images.device)].cpu()):
            raise ExpansionError(f"{self.name}: the images to expand are not the training images it was fitted on")
        b, k = seeds.shape
        y_new, neighbour, t = self.new_latents(parents, seeds)
        decoded = self.autoencoder.decode(y_new.reshape(b * k, *self.latent_shape))
        parent_rows = parents.cpu()[:, None].expand(b, k)
        fields = {
            "parents": [[int(p), int(n)] for p, n in zip(parent_rows.reshape(-1), neighbour.cpu().reshape(-1))],
            "neighbour": neighbour.cpu(),
            "mix_weight": t.cpu(),
        }
        out = to_uint8(decoded)
        return ExpansionOutput(out.reshape(b, k, *out.shape[1:]).cpu(), fields)
