"""dvc.yaml says exactly what each stage depends on: the code it runs (so that a change in it
re-runs the stage, and a change elsewhere does not), params that exist in the schema, and
plots and metrics that some stage writes."""

import pytest
import yaml

from pipeline.config import Params
from tests.conftest import REPO_ROOT
from tests.imports import imported, module_file

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
# The module each stage's `ganpipe` command calls (pipeline/cli.py only parses arguments and
# reports errors, so it is not a dependency of the results).
ENTRY = {
    "prepare": "pipeline.prepare",
    "featurenet": "pipeline.featurenet",
    "train": "pipeline.train",
    "evaluate": "pipeline.evaluate",
    "register": "pipeline.registry",
}


def code_of(entry: str) -> set[str]:
    """The files (and, for gan/, the package) a stage's code is made of."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported(name))
    return {
        "gan" if name.startswith("gan") else str(module_file(name).relative_to(REPO_ROOT))
        for name in seen
    }


@pytest.mark.parametrize("stage", list(ENTRY))
def test_each_stage_depends_on_exactly_the_code_it_runs(stage):
    declared = {d for d in STAGES["stages"][stage]["deps"] if d == "gan" or d.endswith(".py")}
    needed = code_of(ENTRY[stage])
    assert sorted(needed - declared) == [], f"{stage}: add these to its deps in dvc.yaml"
    assert sorted(declared - needed) == [], f"{stage}: it does not run these; remove them"


def test_every_declared_param_is_a_key_of_the_schema():
    for stage, spec in STAGES["stages"].items():
        for entry in spec.get("params", []):
            section, _, key = entry.partition(".")
            assert section in Params.model_fields, f"{stage}: unknown section {section}"
            fields = Params.model_fields[section].annotation.model_fields
            assert not key or key in fields, f"{stage}: unknown key {entry}"


def test_metrics_and_plots_are_outputs_of_some_stage():
    outputs = set()
    for spec in STAGES["stages"].values():
        for entry in spec.get("outs", []) + spec.get("metrics", []):
            outputs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    plotted = [next(iter(p)) if isinstance(p, dict) else p for p in STAGES["plots"]]
    assert plotted and set(plotted) <= outputs
