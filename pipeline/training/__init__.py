"""The training layer under the train stage (pipeline/train.py).

single.py, sweep.py   the two drivers: one run, or a Ray Tune sweep of runs
run.py                their shared plumbing: checks, resume, MLflow run, signals, fit
identity.py           what a run is and what it is called
worker_config.py      the typed object a driver hands every worker
loop.py               the worker loop (every rank), in sessions.py's Train or Tune session
checkpoints.py        the loop's checkpoint I/O; tracker.py: rank 0's MLflow records
outputs.py            the one writer of train.out_dir
faults.py             fault drills for tests and chaos runs
"""
