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
    "augment": "pipeline.augment",
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


def _declared(kind: str) -> dict[str, dict]:
    """Each stage's `kind` entries (outs or metrics): path -> its options ({} for none)."""
    return {
        (next(iter(e)) if isinstance(e, dict) else e): (next(iter(e.values())) or {})
        if isinstance(e, dict) else {}
        for spec in STAGES["stages"].values()
        for e in spec.get(kind, [])
    }  # fmt: skip


def _plotted() -> dict[str, list[str]]:
    """The files the top-level plots show -> the columns plotted from them (none: images)."""
    files: dict[str, list[str]] = {}
    for plot in STAGES["plots"]:
        name, spec = next(iter(plot.items())) if isinstance(plot, dict) else (plot, None)
        if spec and isinstance(spec.get("y"), dict):  # {id: {x, y: {file: columns}}}
            for file, columns in spec["y"].items():
                columns = columns if isinstance(columns, list) else [columns]
                files.setdefault(file, []).extend([spec["x"], *columns])
        else:
            files.setdefault(name, [])
    return files


def test_metrics_and_plots_are_outputs_of_some_stage():
    outputs = set(_declared("outs")) | set(_declared("metrics"))
    assert _plotted() and set(_plotted()) <= outputs


def test_the_metrics_are_what_the_stages_write_and_are_committed_to_git():
    """Metrics in git (cache: false) stay readable in a fresh clone of any commit; the paths
    are the schema's defaults and the train stage's metrics file name."""
    from pipeline.artifacts import TRAIN_METRICS

    defaults = Params()
    assert _declared("metrics") == {
        defaults.featurenet.metrics_file: {"cache": False},
        f"{defaults.train.out_dir}/{TRAIN_METRICS}": {"cache": False},
        defaults.evaluate.metrics_dir: {"cache": False},
        defaults.augment.metrics_dir: {"cache": False},
    }
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    committed = ("metrics", "metrics/evaluate", "metrics/augment")
    assert not any(p.strip("/") in committed for p in ignored)


def test_the_augmentation_plot_shows_the_columns_the_augment_stage_writes():
    """The plot's columns are those of the default run (one candidate, augment.ratios)."""
    from pipeline.augment import BASELINES, ratio_name

    columns = _plotted()["models/augment/accuracy.csv"]
    defaults = Params().augment
    assert columns == ["shots", *BASELINES, *(f"c1_{ratio_name(r)}" for r in defaults.ratios)]


def test_the_loss_and_d_plots_show_what_the_training_step_reports():
    from gan.step import D_KEYS, G_KEYS

    history = _plotted()["models/train/history.csv"]
    assert {"step", "loss_d", "loss_g", "d_real", "d_fake", "fid_domain"} <= set(history)
    assert set(history) - {"step", "fid_domain"} <= set(D_KEYS + G_KEYS)
