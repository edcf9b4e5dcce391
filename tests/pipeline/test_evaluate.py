"""The evaluate stage on real digits, a real featurenet and real train checkpoints.

Candidates here are checkpoints written by pipeline.checkpoint from freshly initialised
models (the train stage's format, without minutes of Ray training); the end-to-end test in
test_pipeline.py scores a trained generator.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from gan.export import load_generator
from gan.models import GeneratorSpec
from gan.sampling import generate
from pipeline.artifacts import RESULT
from pipeline.candidates import generator_from_checkpoint
from pipeline.checkpoint import TrainingState, save_checkpoint
from pipeline.cli import main
from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.errors import EvaluationError
from pipeline.evaluate import (
    _cas,
    _extractors,
    _per_class_fid,
    choose_generator,
    evaluate,
    prepared_generator,
)
from pipeline.featurenet import load_featurenet, read_featurenet_info, train_featurenet
from pipeline.fidelity import FEATURENET
from pipeline.metrics_files import evaluation_metrics
from pipeline.prepare import prepare
from pipeline.scoring import Scorer, class_figures
from pipeline.shards import read_manifest
from pipeline.training.identity import run_identity
from pipeline.training.loop import build_models
from tests.conftest import tree_digest


def eval_params(root, model=None, evaluate=None, prepare_=None, featurenet=None):
    return validate_params(
        {
            "prepare": {"out_dir": str(root / "prepared"), "resolution": 8, **(prepare_ or {})},
            "model": {"g_width": 8, "d_width": 8, "z_dim": 8, **(model or {})},
            "train": {"out_dir": str(root / "train")},
            "featurenet": {
                "epochs": 8,
                "out_dir": str(root / "featurenet"),
                "metrics_file": str(root / "metrics" / "featurenet.json"),
                **(featurenet or {}),
            },
            "evaluate": {
                "num_samples": 500,
                "kid_subset_size": 200,
                "kid_subsets": 20,
                "cache_dir": str(root / "cache"),
                "out_dir": str(root / "evaluate"),
                "metrics_dir": str(root / "metrics" / "evaluate"),
                **(evaluate or {}),
            },
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        }
    )


def save_candidates(params, runs):
    """Write train-stage checkpoints and result.json for `runs`: (name, model params, seed)."""
    data = PreparedSplit(params.prepare.out_dir, "train")
    client = MlflowClient(params.tracking.uri)
    experiment = client.get_experiment_by_name("ganpipe") or client.get_experiment(
        client.create_experiment("ganpipe")
    )
    listed = []
    for name, model, seed in runs:
        run_params = params.model_copy(update={"model": params.model.model_copy(update=model)})
        classes = len(data.class_names) if run_params.model.conditional else 0
        torch.manual_seed(seed)
        g, d = build_models(run_params, data.shape, classes)
        identity = run_identity(run_params, data.dataset_hash)
        save_checkpoint(
            Path(params.train.out_dir) / name,
            {"generator": g, "generator_ema": copy.deepcopy(g), "discriminator": d},
            {
                "opt_g": torch.optim.Adam(g.parameters()),
                "opt_d": torch.optim.Adam(d.parameters()),
            },
            TrainingState(7, 0, 0, identity, data.dataset_hash),
        )
        run = client.create_run(experiment.experiment_id, run_name=name)
        listed.append(
            {"name": name, "checkpoint": name, "mlflow_run_id": run.info.run_id, "steps": 7}
        )
    (Path(params.train.out_dir) / RESULT).write_text(json.dumps({"candidates": listed}))
    return client


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Digits, a featurenet, an unconditional and a conditional candidate, one evaluation."""
    root = tmp_path_factory.mktemp("evaluate")
    params = eval_params(root)
    prepare(params)
    train_featurenet(params)
    client = save_candidates(
        params, [("plain", {}, 1), ("cond", {"conditional": True, "family": "mlp"}, 2)]
    )
    report = evaluate(params)
    return root, params, report, client


def test_every_candidate_gets_every_metric_under_a_recorded_protocol(scored):
    root, params, report, _ = scored
    written = json.loads((root / "evaluate" / "report.json").read_text())
    assert written == json.loads(json.dumps(report))
    # DVC's metrics: a file per candidate in the report's order (c2, the conditional one, has
    # the class figures), and the real data's
    metrics = {p.name: json.loads(p.read_text()) for p in (root / "metrics" / "evaluate").iterdir()}
    assert metrics == {f"{k}.json": v for k, v in evaluation_metrics(report).items()}
    assert set(metrics) == {"c1.json", "c2.json", "real.json"}
    assert {"accuracy", "cas", "fid_class"} <= set(metrics["c2.json"]) - set(metrics["c1.json"])
    assert metrics["c1.json"]["fid"] == pytest.approx(report["candidates"]["plain"]["fid_domain"],
                                                      rel=1e-3)  # fmt: skip
    protocol = report["protocol"]
    assert protocol["feature_extractors"]["domain"]["name"] == "ganpipe-featurenet"
    assert protocol["num_samples"] == 500 and protocol["split"] == "train"
    assert protocol["torch_fidelity"] == "0.4.0" and len(protocol["id"]) == 64
    assert protocol["dataset_hash"] == read_manifest(root / "prepared")["dataset_hash"]
    assert report["inception"]["status"] == "off"
    for name in ("plain", "cond"):
        scores = report["candidates"][name]
        for metric in ("fid", "is", "kid", "precision", "recall", "class_coverage"):
            assert isinstance(scores[f"{metric}_domain"], float), metric
        assert not any(k.endswith("_inception") for k in scores)
        assert 0 < report["sanity"]["fid_floor_domain"] < scores["fid_ceiling_domain"]
    assert report["sanity"]["is_real_domain"] > 5  # ten clear classes: close to 10


def test_conditional_candidates_get_per_class_fid_label_accuracy_and_cas(scored):
    _, _, report, _ = scored
    cond, plain = report["candidates"]["cond"], report["candidates"]["plain"]
    per_class = [v for k, v in cond.items() if k.startswith("fid_class") and k[9].isdigit()]
    assert len(per_class) == 10 and all(v > 0 for v in per_class)
    assert cond["fid_class_mean_domain"] == pytest.approx(sum(per_class) / 10)
    assert 0 <= cond["label_accuracy_domain"] <= 1
    # An untrained generator's images teach nothing about digits: CAS near chance (0.1),
    # far below the same recipe trained on real digits.
    assert cond["cas_accuracy"] < 0.5 < report["featurenet"]["test_accuracy"]
    assert "cas_accuracy" not in plain and "label_accuracy_domain" not in plain


def test_grids_and_exported_generators_reproduce_the_checkpoint(scored):
    root, params, _, _ = scored
    manifest = read_manifest(root / "prepared")
    for name in ("plain", "cond"):
        with Image.open(root / "evaluate" / "samples" / f"{name}.png") as grid:
            assert grid.size == (8 * 8 + 9 * 2, 8 * 8 + 9 * 2)  # 8x8 images, 2-pixel padding
        exported, spec, info = load_generator(root / "evaluate" / "generators" / name)
        which = scored[2]["candidates"][name]["generator"]
        assert info["which"] == which
        original, original_spec, _ = generator_from_checkpoint(
            root / "train" / name, manifest, which
        )
        original = prepared_generator(original, original_spec, params.evaluate.seed)
        assert spec == original_spec and info["candidate"] == name
        assert info["params"]["dataset"] == manifest["dataset_hash"]
        a = generate(exported, 4, spec.z_dim, spec.num_classes, seed=3)
        b = generate(original, 4, spec.z_dim, spec.num_classes, seed=3)
        assert torch.equal(a, b)


def test_both_generators_are_scored_and_the_better_one_is_the_candidate(scored):
    _, _, report, _ = scored
    for name, result in report["candidates"].items():
        ema, raw = result["by_generator"]["ema"], result["by_generator"]["raw"]
        assert {"fid_domain", "kid_domain", "class_coverage_domain"} <= ema.keys() & raw.keys()
        best = min(("ema", "raw"), key=lambda k: result["by_generator"][k]["fid_domain"])
        assert result["generator"] == best, name
        assert result["fid_domain"] == result["by_generator"][best]["fid_domain"]
        choice = result["generator_choice"]
        assert choice["metric"] == "fid_domain" and choice["rule"] == "best"
        fids = ema["fid_domain"], raw["fid_domain"]
        assert choice["gap_ratio"] == pytest.approx(max(fids) / min(fids))


def scores(ema, raw, metric="fid_domain"):
    return {"ema": {metric: ema}, "raw": {metric: raw}}


def test_choice_of_generator_and_the_gap_flag():
    broken_average = choose_generator(scores(169.0, 20.1), "fid_domain", "best")
    assert broken_average["generator"] == "raw" and broken_average["gap_flagged"]
    assert broken_average["gap_ratio"] == pytest.approx(169.0 / 20.1)
    assert "ema fid_domain 169 vs raw 20.1 (8.41x worse)" in broken_average["gap"]
    healthy = choose_generator(scores(18.0, 20.0), "fid_domain", "best")
    assert healthy["generator"] == "ema" and not healthy["gap_flagged"]
    # higher is better: the ratio is best / worst
    coverage = choose_generator(scores(0.3, 0.9, "recall_domain"), "recall_domain", "best")
    assert coverage["generator"] == "raw" and coverage["gap_ratio"] == pytest.approx(3.0)
    # a fixed rule keeps its generator but still reports (and flags) the gap
    forced = choose_generator(scores(169.0, 20.1), "fid_domain", "ema")
    assert forced["generator"] == "ema" and forced["gap_flagged"]
    # a metric only the chosen generator gets (CAS): FID decides
    both = {k: {"fid_domain": v} for k, v in (("ema", 30.0), ("raw", 10.0))}
    assert choose_generator(both, "cas_accuracy", "best")["metric"] == "fid_domain"


def test_metrics_and_grid_are_logged_to_each_candidates_mlflow_run(scored):
    _, _, report, client = scored
    for name, scores in report["candidates"].items():
        run = client.get_run(scores["mlflow_run_id"])
        assert run.data.metrics["eval.fid_domain"] == pytest.approx(scores["fid_domain"])
        assert "eval.sanity.fid_floor_domain" in run.data.metrics
        assert run.data.tags["ganpipe.eval.protocol_id"] == report["protocol"]["id"]
        assert run.data.tags["ganpipe.eval.generator"] == scores["generator"]
        assert scores["generator_choice"]["gap"] in run.data.tags["ganpipe.eval.generator_gap"]
        for which in ("ema", "raw"):
            assert run.data.metrics[f"eval.{which}.fid_domain"] == pytest.approx(
                scores["by_generator"][which]["fid_domain"]
            )
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "evaluate")]
        assert artifacts == [f"evaluate/{name}.png"]


def test_real_features_are_cached_once_per_dataset_extractor_and_split(scored):
    root, params, report, _ = scored
    dataset = report["protocol"]["dataset_hash"][:16]
    cached = sorted(p.name for p in (root / "cache").iterdir())
    assert any(n.startswith(f"{dataset}-train-") and "features-features" in n for n in cached)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "cache").iterdir()}
    (root / "evaluate" / ".gitignore").write_text("/samples\n")  # as DVC writes it
    again = evaluate(params)
    assert (root / "evaluate" / ".gitignore").read_text() == "/samples\n"  # left alone
    after = {p.name: p.stat().st_mtime_ns for p in (root / "cache").iterdir()}
    assert after == before, "a second evaluation recomputed cached real features"
    assert again["candidates"]["plain"]["fid_domain"] == report["candidates"]["plain"]["fid_domain"]


def test_bad_inputs_fail_clearly_and_leave_outputs_untouched(scored, capsys):
    root, params, _, _ = scored
    outputs = tree_digest(root / "evaluate"), tree_digest(root / "metrics" / "evaluate")
    too_big = eval_params(root, evaluate={"kid_subset_size": 500})
    with pytest.raises(EvaluationError, match="kid_subset_size \\(500\\) exceeds the 359 images"):
        evaluate(too_big.model_copy(update={"evaluate": too_big.evaluate.model_copy(
            update={"split": "test"})}))  # fmt: skip
    wrong = eval_params(root, evaluate={"inception": True, "inception_weights": "/no/such.pth"})
    with pytest.raises(EvaluationError, match="/no/such.pth does not exist"):
        evaluate(wrong)
    other_data = eval_params(root, featurenet={"out_dir": str(root / "fn-other")})
    (root / "fn-other").mkdir()
    for f in ("featurenet.json", "featurenet.safetensors"):
        (root / "fn-other" / f).write_bytes((root / "featurenet" / f).read_bytes())
    info = json.loads((root / "fn-other" / "featurenet.json").read_text())
    (root / "fn-other" / "featurenet.json").write_text(
        json.dumps(info | {"dataset_hash": "0" * 64})
    )
    with pytest.raises(EvaluationError, match="re-run the featurenet stage"):
        evaluate(other_data)
    params_file = root / "bad.yaml"
    params_file.write_text(json.dumps(wrong.model_dump(mode="json")))
    assert main(["evaluate", "--params", str(params_file)]) == 1
    assert "inception_weights" in capsys.readouterr().err
    assert (tree_digest(root / "evaluate"), tree_digest(root / "metrics" / "evaluate")) == outputs


class Oracle(torch.nn.Module):
    """A 'generator' whose samples are real images of the class asked for (shifted by
    `offset` classes): what a perfect conditional generator (offset 0) would draw."""

    def __init__(self, pixels, labels, offset=0):
        super().__init__()
        self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.labels, self.offset = torch.from_numpy(labels), offset
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # `generate` finds the device here

    def forward(self, z, labels):
        picks = []
        for noise, label in zip(z, (labels + self.offset) % 10, strict=True):
            pool = self.images[self.labels == label]
            picks.append(pool[int(noise.abs().sum() * 1e4) % len(pool)])
        return torch.stack(picks)


def test_class_figures_reward_samples_of_the_conditioning_class_only(scored):
    root, params, _, _ = scored
    c = params.evaluate
    net, _ = load_featurenet(root / "featurenet")
    pixels, labels = PreparedSplit(root / "prepared", "train").read()
    test_pixels, test_labels = PreparedSplit(root / "prepared", "test").read()
    spec = GeneratorSpec("dcgan", 1, 8, 8, 8, num_classes=10)
    extractors, _ = _extractors(params, read_featurenet_info(root / "featurenet"))
    scorer = Scorer(c, extractors, read_manifest(root / "prepared")["dataset_hash"])
    figures = {}
    for offset in (0, 1):
        oracle = Oracle(pixels, labels, offset)
        fake = generate(oracle, c.num_samples, spec.z_dim, 10, seed=0)
        figures[offset] = (
            class_figures(net, fake, 10, labels)
            | _per_class_fid(scorer, oracle, spec, pixels, labels, c)
            | _cas(fake, 10, test_pixels, test_labels, params, torch.device("cpu"))
        )
    right, shifted = figures[0], figures[1]
    assert right["label_accuracy_domain"] > 0.95 and shifted["label_accuracy_domain"] < 0.05
    assert right["class_coverage_domain"] == shifted["class_coverage_domain"] == 1.0
    # CAS: the featurenet recipe trained on the oracle's 8-px samples (0.85 with the v2 net)
    assert right["cas_accuracy"] > 0.8 and shifted["cas_accuracy"] < 0.05
    assert right["fid_class_mean_domain"] < 0.2 * shifted["fid_class_mean_domain"]


def test_scoring_against_the_test_split(scored):
    root, _, on_train, _ = scored
    params = eval_params(
        root,
        evaluate={
            "split": "test",
            "out_dir": str(root / "evaluate-test"),
            "metrics_dir": str(root / "metrics" / "evaluate-test"),
        },
    )
    report = evaluate(params)
    assert report["protocol"]["split"] == "test" and report["protocol"]["real_samples"] == 359
    assert report["protocol"]["ids"]["domain"] != on_train["protocol"]["ids"]["domain"]
    # The floor is always test against train: it does not depend on the split scored against.
    assert report["sanity"]["fid_floor_domain"] == on_train["sanity"]["fid_floor_domain"]
    plain, plain_on_train = report["candidates"]["plain"], on_train["candidates"]["plain"]
    assert plain["fid_domain"] != plain_on_train["fid_domain"]
    assert any(p.name.split("-")[1] == "test" for p in (root / "cache").iterdir())


def old_torch_fidelity_names(dataset_hash, extractor_sha, real_name="train"):
    """The files torch-fidelity's own pickle cache read for the Scorer's real sets."""
    stem = f"{dataset_hash[:16]}-{real_name}-{extractor_sha[:16]}-{FEATURENET}"
    return [
        f"{stem}-features-features.pt",
        f"{stem}-features-logits.pt",
        f"{stem}-stat-fid-features.pt",
    ]


class MarkerPickle:
    """Unpickled, this creates the file `marker` (what a planted payload would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    """A pickle at `path` in torch.save's format (what torch-fidelity's cache held)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(MarkerPickle(marker), path)


def test_pickles_planted_in_the_feature_cache_never_run_during_evaluate(scored, tmp_path):
    """Issue 13: torch-fidelity's cache unpickled whatever its predictable names held."""
    root, params, report, _ = scored
    written = sorted((root / "cache").iterdir())
    assert written and {p.suffix for p in written} == {".safetensors"}  # no pickles written
    sha = read_featurenet_info(root / "featurenet")["weights_sha256"]
    dataset = report["protocol"]["dataset_hash"]
    real_sets = ["train", *(f"train-class{label}" for label in range(10))]
    old = [n for real in real_sets for n in old_torch_fidelity_names(dataset, sha, real)]
    cache, marker = tmp_path / "cache", tmp_path / "payload-ran"
    for name in {*(p.name for p in written), *old}:
        plant(cache / name, marker)
    planted = params.model_copy(update={
        "evaluate": params.evaluate.model_copy(update={
            "cache_dir": str(cache), "out_dir": str(tmp_path / "evaluate"),
            "metrics_dir": str(tmp_path / "metrics-evaluate"),
        }),
        "tracking": params.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'm.db'}"}),
    })  # fmt: skip
    again = evaluate(planted)
    assert not marker.exists()
    assert again["sanity"] == pytest.approx(report["sanity"], rel=1e-6)
    for name, result in report["candidates"].items():
        for key in ("fid_domain", "kid_domain", "is_domain", "precision_domain", "recall_domain"):
            assert again["candidates"][name][key] == pytest.approx(result[key], rel=1e-6), key
    assert {p.suffix for p in cache.iterdir()} == {".safetensors", ".pt"}  # .pt never read


def test_an_evaluate_out_dir_holding_what_ganpipe_did_not_write_is_refused_first(tmp_path):
    from pipeline.evaluate import evaluate
    from pipeline.files import OutputError

    out = tmp_path / "evaluate"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "mine.png").write_bytes(b"a user's grid")
    params = validate_params(
        {"prepare": {"out_dir": str(tmp_path / "absent")}, "evaluate": {"out_dir": str(out)}}
    )  # nothing prepared: the refusal comes before any work
    with pytest.raises(OutputError, match=r"evaluate.out_dir .* holds samples, which the evaluate"):
        evaluate(params)
    assert (out / "samples" / "mine.png").read_bytes() == b"a user's grid"
