"""The training progress line and its timing: skipped-data counts, examples and epochs seen,
throughput that leaves out in-loop evals, and an ETA that leaves out compilation."""
from __future__ import annotations

import pytest

from simvlm_jax.metric_writer import StepTimer, format_duration, format_progress, steps_per_second

METRICS = {"loss": 1.23456, "token_accuracy": 0.5, "learning_rate": 1e-3}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run_steps(timer: StepTimer, clock: FakeClock, n: int, seconds_each: float) -> None:
    for _ in range(n):
        clock.now += seconds_each
        timer.step()


def test_progress_line_shows_skips_examples_epochs_and_eta():
    line = format_progress(50, 1200, {**METRICS, "mfu": 0.012}, examples_per_sec=162.4, eta=250.0,
                           examples_seen=3200, epochs={"builtin_captions": 0.4},
                           skipped={"corrupt_image": 3, "empty_caption": 1, "too_long": 0})
    assert line == ("step 50/1200 loss 1.2346 acc 0.500 lr 1.00e-03 | 162 ex/s | MFU 1.2% | "
                    "3,200 examples (0.40 epochs) | skipped 4: corrupt_image 3, empty_caption 1 | ETA 4m10s")


def test_progress_line_hides_zero_skips_and_lists_epochs_per_task():
    line = format_progress(100, 200, METRICS, examples_per_sec=10.0, eta=None, examples_seen=6400,
                           epochs={"images": 1.25, "text": 0.03}, skipped={"corrupt_image": 0})
    assert "skipped" not in line
    assert "6,400 examples (epochs: images 1.25, text 0.03)" in line
    assert line.endswith("ETA ?")
    no_size = format_progress(100, 200, METRICS, examples_per_sec=10.0, eta=5.0, examples_seen=6400, epochs={})
    assert "| 6,400 examples |" in no_size


def test_first_progress_line_reports_compilation_instead_of_rate_and_eta():
    line = format_progress(1, 1200, METRICS, examples_per_sec=0.8, eta=None, examples_seen=64,
                           first_step_sec=79.8)
    assert "first step 79.8s (incl. compilation)" in line
    assert "ex/s" not in line and "ETA" not in line


def test_steps_per_second_leaves_out_excluded_time():
    assert steps_per_second(50, 30.0, excluded=20.0) == pytest.approx(5.0)
    assert steps_per_second(0, 30.0) is None
    assert steps_per_second(5, 10.0, excluded=10.0) is None


def test_throughput_after_an_in_training_eval_excludes_the_eval():
    clock = FakeClock()
    timer = StepTimer(clock)
    _run_steps(timer, clock, 1, 60.0)      # first step: compilation
    timer.window()                         # the first log line
    clock.now += 11.0                      # the first checkpoint save
    timer.started()
    _run_steps(timer, clock, 50, 0.4)
    assert timer.window() == pytest.approx(0.4)
    clock.now += 100.0                      # an eval right after that log line
    timer.exclude(100.0)
    _run_steps(timer, clock, 50, 0.4)
    # Without the exclusion: (20 + 100) / 50 = 2.4 s per step, a 6x drop in ex/s.
    assert timer.window() == pytest.approx(0.4)


def test_eta_leaves_out_compilation_and_evals():
    clock = FakeClock()
    timer = StepTimer(clock)
    _run_steps(timer, clock, 1, 300.0)     # compile + first step
    assert timer.eta(99) is None           # no steady-state step timed yet
    clock.now += 11.0                      # the first checkpoint save
    timer.started()
    _run_steps(timer, clock, 10, 0.2)
    clock.now += 50.0
    timer.exclude(50.0)
    _run_steps(timer, clock, 10, 0.2)
    assert timer.eta(100) == pytest.approx(20.0)   # 100 steps x 0.2 s


def test_format_duration():
    assert format_duration(250) == "4m10s"
    assert format_duration(7620) == "2h07m"


def test_epochs_per_step_reads_the_gin_bound_training_data(clean_gin):
    import gin  # pylint: disable=import-outside-toplevel
    from simvlm_jax import train  # pylint: disable=import-outside-toplevel
    from simvlm_jax.data import pipeline  # noqa: F401  pylint: disable=import-outside-toplevel (registers it)
    calls = []

    class FakePipeline:
        @staticmethod
        def epochs_per_run(name, split, global_batch_size, num_steps):
            calls.append((name, split, global_batch_size, num_steps))
            return {"images": (1000, 0.064), "empty": (0, 0.0)}

    assert train.epochs_per_step(FakePipeline, 64) == {}  # nothing bound: size unknown
    gin.bind_parameter("make_train_iterator.mixture_or_task_name", "mix")
    gin.bind_parameter("make_train_iterator.split", "validation")
    assert train.epochs_per_step(FakePipeline, 64) == {"images": 0.064}
    assert calls == [("mix", "validation", 64, 1)]


def test_data_wait_fraction_is_the_windows_share_blocked_on_the_pipeline():
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.started()
    for _ in range(10):                    # each step: 0.3 s waiting for data, 0.1 s the rest
        clock.now += 0.3
        timer.waited(0.3)
        clock.now += 0.1
        timer.step()
    assert timer.window() == pytest.approx(0.4)
    assert timer.data_wait_fraction == pytest.approx(0.75)
    _run_steps(timer, clock, 10, 0.4)      # device-bound: the next batch is always ready
    timer.window()
    assert timer.data_wait_fraction == 0.0
    bound = format_progress(100, 200, {**METRICS, "data_wait_fraction": 0.75}, examples_per_sec=10.0, eta=5.0,
                            examples_seen=6400)
    assert "waiting for data 75% of the time" in bound
    fed = format_progress(100, 200, {**METRICS, "data_wait_fraction": 0.01}, examples_per_sec=10.0, eta=5.0,
                          examples_seen=6400)
    assert "waiting for data" not in fed
