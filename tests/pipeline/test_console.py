"""The console a person watches: progress lines in place on a terminal, plain periodic lines
in a log file, and the texts of a run's and a sweep's line."""

import io

from pipeline.console import ProgressLine, duration, training_text
from pipeline.training.progress import sweep_text


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_line_is_rewritten_in_place_and_ended_once():
    out = Terminal()
    line = ProgressLine("train run", out)
    line.update("step 1/4")
    line.update("step 2/4")
    line.close()
    assert out.getvalue() == "\rtrain run: step 1/4\rtrain run: step 2/4\rtrain run: step 2/4\n"


def test_in_a_log_file_the_line_comes_as_plain_lines_at_most_every_interval_and_the_last():
    out = io.StringIO()
    line = ProgressLine("train run", out, every_s=3600)
    for step in range(1, 5):
        line.update(f"step {step}/4")
    line.close()
    assert out.getvalue() == "train run: step 1/4\ntrain run: step 4/4\n"
    assert "\r" not in out.getvalue()


def test_a_run_s_line_has_steps_rate_eta_and_losses():
    report = {"step": 250, "steps": 1000, "images_per_s": 1234.5, "eta_s": 65.0,
              "loss_d": 0.6234, "loss_g": 1.9}  # fmt: skip
    assert training_text(report) == (
        "step 250/1,000 (25%) | 1,234 img/s | ETA 1m05s | loss_d 0.623 loss_g 1.900"
    )
    done = training_text({**report, "step": 1000, "fid_domain": 12.345})
    assert "ETA" not in done and done.endswith("fid 12.35")
    assert duration(3.21) == "3.2 s" and duration(7380) == "2h03m"


def test_a_sweep_s_line_counts_trials_and_shows_the_best_fid():
    trials = [
        ("RUNNING", {"step": 20, "fid_domain": 30.0}),
        ("TERMINATED", {"step": 60, "fid_domain": 12.5}),  # completed
        ("TERMINATED", {"step": 20, "fid_domain": float("inf")}),  # stopped (diverged)
        ("PENDING", {}),
    ]
    assert sweep_text(trials, steps=60) == (
        "trials: 1 running, 1 completed, 1 stopped, 1 pending | best fid 12.50"
    )
