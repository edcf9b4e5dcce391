"""Errors of the stages that the CLI reports as bad input (exit 1).

They live apart from the stages so that the CLI can name them without importing torch-fidelity
or MLflow."""


class EvaluationError(ValueError):
    """Evaluation cannot run as configured (too few samples, missing weights, a bad feature
    network); the message names the key or file and the fix."""


class RegistryError(RuntimeError):
    """The model registry cannot be used, or a model URI cannot be resolved or trusted."""


class SweepError(ValueError):
    """A sweep cannot run as configured on this cluster (trials that can never be placed)."""


class ClusterError(ConnectionError):
    """The Ray cluster named by RAY_ADDRESS (or ray.address) cannot be joined."""
