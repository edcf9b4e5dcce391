"""Errors of the stages that the CLI reports as bad input (exit 1), and how much of the user's
input any error message may repeat (shorten, echo).

They live apart from the stages so that the CLI can name them without importing torch-fidelity
or MLflow."""


class DataError(ValueError):
    """Prepared data is missing or damaged; the message names the file and the fix."""


class EvaluationError(ValueError):
    """Evaluation cannot run as configured (too few samples, missing weights, a bad feature
    network); the message names the key or file and the fix."""


class RegistryError(RuntimeError):
    """The model registry cannot be used, or a model URI cannot be resolved or trusted."""


class SweepError(ValueError):
    """A sweep cannot run as configured on this cluster (trials that can never be placed)."""


class SynthesisError(ValueError):
    """A synthesis request that cannot be answered (pipeline.synthesize, the augment stage);
    the message says what to change."""


class ClusterError(ConnectionError):
    """The Ray cluster named by RAY_ADDRESS (or ray.address) cannot be joined."""


# The most an error message repeats of a value the user gave: a 10 MB value (or a key, or an
# alias bomb written out) must not become a 10 MB message.
ECHO_LIMIT = 200


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text`, or its first `limit` characters with a note of how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text):,} characters]"


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """repr(value) for an error message, shortened to about `limit` characters."""
    return shorten(repr(value), limit)
