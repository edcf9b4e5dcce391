"""ganpipe: the Python API for registered generators (docs/models.md).

    import ganpipe

    g = ganpipe.load("models:/ganpipe-generator@champion")  # checked against the registry
    images = g.sample(16, seed=0, truncation=0.7)            # (16, C, H, W) in [0, 1]
    frames = g.interpolate(0, 1, steps=8, method="slerp")    # seed 0's sample ... seed 1's
    ganpipe.save_images(frames, "walk.gif")                  # or a .png grid

- `load(model_uri, tracking_uri=None)` -> `LoadedGenerator`: `.sample`, `.interpolate`, `.spec`,
  `.task`, `.info`, `.generator`; `.translate` / `.prompt` for the tasks that take an image / a
  text (a TypeError naming the task otherwise).
- `save_images(images, out, nrow=8, frame_ms=100)`: a .png grid or a .gif animation.
- `fetch_verified(model_uri, destination, tracking_uri=None)`: a checked copy to serve.
- `synthesize(SynthesisRequest(model_uri, num_images, out, ...))`: a labeled synthetic dataset
  (an image folder prepare reads, or prepared shards) with its provenance.
- `RegistryError`: a model that cannot be found or trusted.

They live in pipeline/serving.py, which checks every model as all ganpipe load paths do (data
only, files hashed to the digest the registry pins). Importing this package is cheap: they,
torch and MLflow are imported on first use, and Ray never.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it, imported when the name is first used
EXPORTS = {
    "LoadedGenerator": "pipeline.serving",
    "RegistryError": "pipeline.errors",
    "fetch_verified": "pipeline.serving",
    "load": "pipeline.serving",
    "save_images": "pipeline.serving",
    "SynthesisRequest": "pipeline.synthesize",
    "synthesize": "pipeline.synthesize",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'ganpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # later uses do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})
