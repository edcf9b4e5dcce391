"""`import ganpipe`: the user API, cheap to import (its loads: tests/pipeline/test_serving.py)."""

import ast
import subprocess
import sys

import pytest

import ganpipe


def test_importing_ganpipe_loads_no_ray_and_nothing_heavy_until_used():
    code = (
        "import sys, ganpipe;"
        "heavy = {'ray', 'mlflow', 'torch', 'torchvision', 'torch_fidelity'};"
        "top = lambda: sorted({m.split('.')[0] for m in sys.modules} & heavy);"
        "print(top()); ganpipe.load; print(top())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(ast.literal_eval, out.stdout.strip().splitlines())
    assert before == []
    assert "mlflow" in after and "torch" in after and "ray" not in after  # what a load needs


def test_the_documented_names_are_there_and_only_they():
    assert ganpipe.__all__ == [
        "LoadedGenerator", "RegistryError", "SynthesisRequest", "fetch_verified", "load",
        "save_images", "synthesize",
    ]  # fmt: skip
    from pipeline.serving import LoadedGenerator, load
    from pipeline.synthesize import synthesize

    assert ganpipe.load is load and ganpipe.LoadedGenerator is LoadedGenerator
    assert ganpipe.synthesize is synthesize
    assert set(ganpipe.__all__) <= set(dir(ganpipe))
    with pytest.raises(AttributeError, match="module 'ganpipe' has no attribute 'sample_grid'"):
        ganpipe.sample_grid  # noqa: B018
