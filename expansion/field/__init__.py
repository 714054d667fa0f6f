"""The field's generative augmentation methods (docs/fidelity.md): open-set text-to-image, Real Guidance,
DiffuseMix and DistDiff, each on :mod:`expansion.stable_diffusion`."""
