"""Training across two Ray nodes (ray.cluster_utils.Cluster: two raylets on this machine)."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.prepare import prepare
from tests.pipeline.test_train import final_weights, tiny_params


@pytest.fixture
def two_node_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_workers_on_two_nodes_train_in_lockstep(tmp_path, two_node_cluster):
    from pipeline.config import validate_params
    from pipeline.train import train

    base = tiny_params(tmp_path, "spread", steps=8).model_dump(mode="json")
    base["ray"]["placement_strategy"] = "STRICT_SPREAD"  # one worker per node
    params = validate_params(base)
    prepare(params, progress=False)
    result = train(params)  # debug_checks: ranks compare weights before every checkpoint
    assert result["steps"] == 8 and not result["diverged"]
    run = MlflowClient(params.tracking.uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["ganpipe.num_nodes"] == "2"
    weights = final_weights(params)
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
