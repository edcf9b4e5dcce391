"""MLflow tracking under concurrent trials: the embedded sqlite store with 4 writers."""

import multiprocessing

from mlflow.tracking import MlflowClient

from pipeline.train import _log_metrics

REPORTS, METRICS = 60, 12


def _report(uri: str, run_id: str, errors) -> None:
    """What a sweep trial's rank 0 does at every report (pipeline.train._log_metrics)."""
    config = {"tracking_uri": uri, "mlflow_run_id": run_id}
    for step in range(1, REPORTS + 1):
        try:
            _log_metrics(config, {f"m{k}": step * 0.5 + k for k in range(METRICS)}, step)
        except Exception as exc:  # counted, so the test shows what went wrong
            errors.put(repr(exc))


def test_four_concurrent_trials_lose_no_metric_point_in_sqlite(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    runs = [client.create_run(experiment).info.run_id for _ in range(4)]
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    writers = [context.Process(target=_report, args=(uri, run, errors)) for run in runs]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []  # e.g. no "database is locked"
    for run in runs:
        for k in range(METRICS):
            history = client.get_metric_history(run, f"m{k}")
            assert sorted(m.step for m in history) == list(range(1, REPORTS + 1))
            assert {m.value for m in history} == {s * 0.5 + k for s in range(1, REPORTS + 1)}
