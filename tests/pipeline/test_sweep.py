"""Ray Tune sweeps over real Ray Train trials on 8x8 digits (local Ray, 2 CPUs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import validate_params
from pipeline.featurenet import train_featurenet
from pipeline.prepare import prepare
from pipeline.training.sweep import InstabilityStopper, stability_table, trial_params, tune_space


def sweep_params(root, space, **sweep):
    return validate_params(
        {
            "prepare": {"out_dir": str(root / "prepared"), "resolution": 8},
            "model": {"g_width": 8, "d_width": 8, "z_dim": 8},
            "train": {"steps": 40, "batch_size": 32, "out_dir": str(root / "train")},
            "featurenet": {
                "epochs": 8,
                "out_dir": str(root / "featurenet"),
                "metrics_file": str(root / "featurenet.json"),
            },
            "evaluate": {"cache_dir": str(root / "cache")},
            "sweep": {"space": space, "eval_every": 20, "eval_samples": 200, **sweep},
            "ray": {"num_workers": 1, "storage_path": str(root / "runs")},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        }
    )


def test_trial_params_apply_the_sample_and_report_at_every_evaluation():
    base = validate_params(
        {"sweep": {"space": {"train.lr_g": {"type": "choice", "values": [1e-4]}}}}
    )
    params = trial_params(base.model_dump(mode="json"), {"train.lr_g": 1e-3}, 25)
    assert params.train.lr_g == 1e-3 and params.sweep.space == {}
    assert params.train.log_every == params.train.checkpoint_every == 25


def test_search_space_converts_every_dimension_type():
    from ray.tune.search.sample import Categorical, Float

    params = validate_params({"sweep": {"space": {
        "train.lr_g": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "train.beta1": {"type": "uniform", "low": 0.0, "high": 0.5},
        "train.loss": {"type": "choice", "values": ["hinge", "bce"]},
        "model.g_width": {"type": "grid", "values": [8, 16]},
    }}})  # fmt: skip
    space = tune_space(params.sweep.space)
    assert isinstance(space["train.lr_g"], Float) and isinstance(space["train.beta1"], Float)
    assert isinstance(space["train.loss"], Categorical)
    assert space["model.g_width"] == {"grid_search": [8, 16]}


@pytest.mark.parametrize(
    "results, reason",
    [
        ([{"fid_domain": 50.0, "diverged": True}], "diverged"),
        ([{"fid_domain": 50.0 - i, "d_real": 0.999, "d_fake": 0.001} for i in range(3)],
         "d_collapse"),
        ([{"fid_domain": 50.0 - i, "class_coverage_domain": c}
          for i, c in enumerate((0.9, 0.2, 0.2, 0.2))], "mode_collapse"),
        ([{"fid_domain": 50.0 - i, "class_coverage_domain": 0.2} for i in range(4)],
         None),  # never covered the classes yet: training, not collapse
        ([{"fid_domain": f} for f in (40.0, 41.0, 42.0, 43.0)], "fid_worsening"),
        ([{"fid_domain": f, "d_real": 0.7, "d_fake": 0.3} for f in (50.0, 40.0, 30.0)], None),
        ([{"fid_domain": 50.0, "step": s, "class_coverage_domain": 0.1} for s in (20, 40, 40)],
         None),  # Tune repeats the last result of a trial: one evaluation, not two
    ],
)  # fmt: skip
def test_stopper_labels_why_a_trial_ends(tmp_path, results, reason):
    stopper = InstabilityStopper(str(tmp_path / "reasons.json"), 3, 0.02, 0.5)
    stopped = [stopper("t1", r) for r in results]
    assert stopped[-1] == (reason is not None) and not any(stopped[:-1])
    saved = json.loads((tmp_path / "reasons.json").read_text()) if reason else {}
    assert saved == ({"t1": reason} if reason else {})


def test_a_sweep_is_unfinished_while_a_trial_runs_or_has_not_started():
    from pipeline.training.sweep import sweep_unfinished

    assert not sweep_unfinished(["TERMINATED", "ERROR", "TERMINATED"], 3)
    assert sweep_unfinished(["TERMINATED", "RUNNING", "PENDING"], 3)
    # Interrupted just after ASHA stopped the second of three trials: none runs, one to go.
    assert sweep_unfinished(["TERMINATED", "TERMINATED"], 3)


def test_stability_table_counts_endings_per_loss_and_learning_rate_decade():
    trials = [
        {"config": {"train.loss": "hinge", "train.lr_g": 2e-4}, "stop_reason": "completed"},
        {"config": {"train.loss": "hinge", "train.lr_g": 5e-4}, "stop_reason": "diverged"},
        {"config": {"train.loss": "bce", "train.lr_g": 0.5}, "stop_reason": "d_collapse"},
    ]
    assert stability_table(trials) == [
        {"loss": "bce", "lr_decade": "1e-1", "trials": 1, "d_collapse": 1},
        {"loss": "hinge", "lr_decade": "1e-4", "trials": 2, "completed": 1, "diverged": 1},
    ]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from pipeline.cluster import start_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)  # with its dashboard: see _check_stoppable
    yield
    ray.shutdown()


def test_trials_at_once_never_ask_for_more_cpus_than_the_cluster_has(tmp_path, ray_session):
    from pipeline.errors import SweepError
    from pipeline.training.sweep import _concurrency

    space = {"train.lr_g": {"type": "choice", "values": [1e-4]}}

    def at_once(workers, **sweep):
        params = sweep_params(tmp_path, space, **sweep)
        return _concurrency(params.model_copy(update={"ray": params.ray.model_copy(
            update={"num_workers": workers})}))  # fmt: skip

    assert at_once(1) == 2  # 2 CPUs, one per trial
    assert at_once(1, max_concurrent=1) == 1
    assert at_once(2) == 1  # a 2-worker trial takes both CPUs
    with pytest.raises(SweepError, match="a trial needs 3 CPUs .* the cluster has 2"):
        at_once(3)


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory):
    """Prepared digits and a featurenet, shared by the sweeps below."""
    root = tmp_path_factory.mktemp("sweep")
    params = sweep_params(root, {})
    prepare(params)
    train_featurenet(params)
    return root


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, prepared_root):
    """Interrupted twice, as users do: SIGINT (Ctrl-C; Tune saves its state) once the first
    trial finished and the second has a checkpoint, then SIGKILL (the driver dies; Tune's
    last periodic state is all there is) once the second finished and the third has one.
    Each new driver (`dvc repro` again) restores the sweep: finished trials are not run
    again, the unfinished one continues in the same MLflow run."""
    space = {"train.lr_g": {"type": "grid", "values": [2e-4, 5e-4, 1e-3]}}
    params = sweep_params(  # FIFO, patient: every trial runs to the end (none ASHA stops)
        prepared_root, space, num_trials=1, top_k=1, max_concurrent=1, scheduler="fifo",
        patience=100,
    )  # fmt: skip
    tree = params.model_dump(mode="json")
    tree["train"] |= {"steps": 60, "out_dir": str(tmp_path / "train")}
    tree["ray"]["storage_path"] = str(tmp_path / "runs")
    tree["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(json.dumps(tree))
    command = [sys.executable, "-m", "pipeline", "train"]

    def steps_by_trial():
        found = {}
        for state in (tmp_path / "runs").glob("gan-*/checkpoint_*/state.json"):
            run = state.parent.parent.name
            found[run] = max(found.get(run, 0), json.loads(state.read_text())["step"])
        return found

    def files_of(run):
        return sorted(p.name for p in (tmp_path / "runs" / run).iterdir())

    def interrupt_once_finished(trials, sig, returncode):
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()[-3000:]
            steps = steps_by_trial()
            if sorted(steps.values()).count(60) == trials and len(steps) == trials + 1:
                break
            time.sleep(0.5)
        # Finished in Tune's eyes: the next trial only starts (max_concurrent 1) once the
        # previous one ended. One that reaches its last step while Tune stops is not: it is
        # resumed from the last checkpoint Tune recorded, which is what Tune should do.
        finished = {run for run, step in steps.items() if step == 60}
        files = {run: files_of(run) for run in finished}
        os.kill(process.pid, sig)
        process.wait(timeout=120)
        assert process.returncode == returncode, process.stderr.read()[-3000:]
        return files

    files = interrupt_once_finished(1, signal.SIGINT, 130)
    again = interrupt_once_finished(2, signal.SIGKILL, -9)
    assert set(files) < set(again)
    assert {run: files_of(run) for run in files} == files  # not run again
    files = again

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "result.json").read_text())
    assert [t["stop_reason"] for t in summary["trials"]] == ["completed"] * 3
    assert {run: files_of(run) for run in files} == files  # the finished ones not run again
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ganpipe").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_population_based_training_exploits_checkpoints_with_the_new_learning_rates(
    tmp_path, prepared_root, ray_session
):
    from pipeline.train import train

    space = {"train.lr_g": {"type": "loguniform", "low": 1e-4, "high": 2e-3}}
    params = sweep_params(  # patience: no trial is stopped, every one has to reach the end
        prepared_root, space, num_trials=4, top_k=2, scheduler="pbt", patience=100
    )
    tree = params.model_dump(mode="json")
    tree["train"] |= {"steps": 60, "out_dir": str(tmp_path / "train")}
    # The population must train side by side to compare: 4 half-CPU trials on 2 CPUs.
    tree["ray"] |= {"storage_path": str(tmp_path / "runs"), "cpus_per_worker": 0.5}
    summary = train(validate_params(tree))
    assert len(summary["trials"]) == 4 and len(summary["candidates"]) == 2
    ended = [(t["steps"], t["stop_reason"], t["config"]) for t in summary["trials"]]
    assert all(t["steps"] == 60 for t in summary["trials"]), ended
    exploits = list((tmp_path / "runs").rglob("pbt_policy_*.txt"))
    assert exploits, "PBT never exploited a better trial"


@pytest.mark.slow
def test_an_optuna_progan_sweep_scores_every_trial_at_the_final_size_and_hands_on_grown_ones(
    tmp_path, prepared_root, ray_session
):
    """Optuna proposes the fade length and G's learning rate of trials growing 4 -> 8 px under
    ASHA: at the rung (step 20) no trial has grown yet, yet every one has a finite FID at 8 px
    (its samples upsampled); the candidates are the trials that grew to the end, and each
    exports."""
    from pipeline.candidates import generator_from_checkpoint
    from pipeline.shards import read_manifest
    from pipeline.train import train

    space = {
        "train.fade_kimg": {"type": "choice", "values": [0.32, 0.48]},
        "train.lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-3},
    }
    params = sweep_params(prepared_root, space, num_trials=2, top_k=2, search="optuna")
    tree = params.model_dump(mode="json")
    tree["model"] |= {"family": "progan", "start_resolution": 4, "g_width": 16, "d_width": 16}
    tree["train"] |= {"stabilise_kimg": 0.32, "loss": "wasserstein", "gp_weight": 10.0,
                      "drift_weight": 0.001, "out_dir": str(tmp_path / "train")}  # fmt: skip
    tree["ray"]["storage_path"] = str(tmp_path / "runs")
    summary = train(validate_params(tree))
    trials = summary["trials"]
    configs = [t["config"] for t in trials]
    assert len(configs) == 2 and configs[0] != configs[1]
    assert all(1e-4 <= c["train.lr_g"] <= 1e-3 and c["train.fade_kimg"] in (0.32, 0.48)
               for c in configs)  # fmt: skip
    assert all(t["best_fid"] is not None for t in trials), trials
    for trial in trials:
        assert trial["grown"] == (trial["stop_reason"] == "completed"), trial
    grown = sorted(t["run_name"] for t in trials if t["grown"])
    assert grown and sorted(c["name"] for c in summary["candidates"]) == grown
    manifest = read_manifest(prepared_root / "prepared")
    for candidate in summary["candidates"]:
        generator, spec, _ = generator_from_checkpoint(
            tmp_path / "train" / candidate["checkpoint"], manifest
        )
        assert spec.resolution == 8 and generator(torch.zeros(2, spec.z_dim)).shape[-1] == 8


def test_a_trial_stopped_before_it_grew_to_the_end_is_no_candidate():
    import pandas as pd

    from pipeline.training.sweep import grown_at_last_checkpoint

    def frame(*rows):  # (resolution, alpha, checkpoint or None) per report
        return pd.DataFrame(
            [{"resolution": r, "alpha": a, "checkpoint_path": c} for r, a, c in rows]
        )

    stopped = frame((8, 0.9, "ckpt-20"))
    grown = frame((8, 0.9, "ckpt-20"), (8, 1.0, "ckpt-40"))
    unsaved = frame((8, 0.9, "ckpt-20"), (8, 1.0, None))  # grown after its last checkpoint
    assert not grown_at_last_checkpoint(stopped, 8)
    assert grown_at_last_checkpoint(grown, 8)
    assert not grown_at_last_checkpoint(unsaved, 8)
    assert grown_at_last_checkpoint(unsaved, 8, tune_managed=True)  # PBT: the last report's
    assert not grown_at_last_checkpoint(frame((4, 1.0, "ckpt")), 8)
    assert grown_at_last_checkpoint(pd.DataFrame([{"fid_domain": 3.0}]), 8)  # no growing


def test_an_exploited_checkpoint_trains_on_with_this_trials_learning_rates(tmp_path):
    """PBT's trap: restoring an optimiser state dict brings the source trial's lr along."""
    from gan.ema import GeneratorEMA
    from gan.step import GANTrainState
    from pipeline.training.loop import _apply_hyperparameters

    params = validate_params({"train": {"lr_g": 3e-4, "lr_d": 5e-4, "beta1": 0.5, "beta2": 0.9}})
    g, d = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    state = GANTrainState(
        g, d, torch.optim.Adam(g.parameters(), 1e-2), torch.optim.Adam(d.parameters(), 1e-2),
        GeneratorEMA(g, 1, 1),
    )  # fmt: skip
    source = torch.optim.Adam(g.parameters(), 7e-3, betas=(0.1, 0.2)).state_dict()
    state.opt_g.load_state_dict(source)  # what restoring the better trial's checkpoint does
    _apply_hyperparameters(state, params.train)
    assert [(grp["lr"], grp["betas"]) for grp in state.opt_g.param_groups] == [(3e-4, (0.5, 0.9))]
    assert [(grp["lr"], grp["betas"]) for grp in state.opt_d.param_groups] == [(5e-4, (0.5, 0.9))]


def test_a_ray_without_its_dashboard_is_refused_instead_of_hanging(tmp_path):
    code = (
        "import ray, sys\n"
        "from pipeline.errors import SweepError\n"
        "from pipeline.training.sweep import _check_stoppable\n"
        "from tests.pipeline.test_sweep import sweep_params\n"
        "from pathlib import Path\n"
        'ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)\n'
        "space = {'train.lr_g': {'type': 'choice', 'values': [1e-4]}}\n"
        "try:\n"
        "    _check_stoppable(sweep_params(Path(sys.argv[1]), space))\n"
        "except SweepError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert "runs without its dashboard" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    ("options", "milestones"),
    [({}, [20]), ({"grace_period": 10, "reduction_factor": 2}, [40, 20, 10])],
)
def test_asha_rungs_follow_grace_period_and_reduction_factor(tmp_path, options, milestones):
    from pipeline.training.sweep import _scheduler

    space = {"train.seed": {"type": "grid", "values": [0, 1]}}
    scheduler = _scheduler(sweep_params(tmp_path, space, **options))  # steps 40, eval_every 20
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == milestones


def test_random_search_is_seeded_by_train_seed(tmp_path):
    """The same params draw the same trials (a resumed or repeated sweep, a benchmark's two
    arms); another train.seed draws others."""
    from pipeline.training.sweep import _search

    space = {
        "train.lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "train.loss": {"type": "choice", "values": ["hinge", "bce"]},
    }

    def draws(seed):
        params = sweep_params(tmp_path, space)
        params = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
        search = _search(params, concurrency=3)
        experiment = {"run": lambda config: None, "config": tune_space(params.sweep.space)}
        search.add_configurations({"sweep": {**experiment, "num_samples": 3}})
        return [trial.config for trial in iter(search.next_trial, None)]

    first = draws(0)
    assert len(first) == 3 and len({c["train.lr_g"] for c in first}) == 3
    assert draws(0) == first and draws(1) != first


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_the_searcher_starts_no_more_trials_than_run_at_once(tmp_path, search):
    from pipeline.training.sweep import _search

    space = {"train.lr_g": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    params = sweep_params(tmp_path, space, search=search)
    searcher = _search(params, concurrency=2)
    if search == "random":
        experiment = {"run": lambda config: None, "config": tune_space(params.sweep.space)}
        searcher.add_configurations({"sweep": {**experiment, "num_samples": 5}})
        started = list(iter(searcher.next_trial, None))
    else:
        searcher.set_search_properties("fid_domain", "min", tune_space(params.sweep.space))
        suggested = (searcher.suggest(f"trial_{i}") for i in range(5))
        started = [config for config in suggested if config is not None]
    assert len(started) == 2
