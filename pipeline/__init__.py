"""The pipeline's stages and their plumbing: params schema, data, Ray training, evaluation,
MLflow tracking and registry, and the `ganpipe` command line."""
