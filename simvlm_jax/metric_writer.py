"""Training metrics to stdout, `<work_dir>/metrics.jsonl` and TensorBoard; process 0 only.
Also the progress line (`format_progress`) and the timing behind its ex/s and ETA (`StepTimer`).

`work_dir` may be a URL (gs://bucket/run): metrics.jsonl and the TensorBoard events are then
written to a local staging directory and uploaded whole (`storage.LocalMirror`; object stores
cannot append) at most every `sync_every_s` seconds, and at `write_config` and `close`."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Mapping

import jax

from simvlm_jax import storage


class MetricWriter:
    def __init__(self, work_dir: str, tensorboard: bool = True, sync_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.work_dir = work_dir
        self.sync_every_s = sync_every_s
        self._jsonl = self._tb = self._mirror = None
        self._last_sync = time.monotonic()
        if not self.enabled:
            return
        local_dir = work_dir
        if storage.is_remote(work_dir):
            storage.makedirs(work_dir)
            self._mirror = storage.LocalMirror(work_dir)
            self._mirror.pull("metrics.jsonl")  # a resumed run appends to it
            local_dir = self._mirror.local_dir
        os.makedirs(local_dir, exist_ok=True)
        self._jsonl = open(os.path.join(local_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            # Lazy: tensorboardX imports PyTorch whenever it is installed (seconds, for every CLI).
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (loads PyTorch)
            self._tb = SummaryWriter(os.path.join(local_dir, "tensorboard"))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self._sync()

    def write_config(self, gin_config: str, mesh_shape: dict, num_params: int) -> None:
        if not self.enabled:
            return
        storage.write_text(os.path.join(self.work_dir, "config.gin"), gin_config)
        if self._tb:
            self._tb.add_text("config", f"mesh {mesh_shape}, {num_params:,} params\n\n```\n{gin_config}\n```")
        self._sync(force=True)

    def write_image(self, tag: str, step: int, image_hwc) -> None:
        if self.enabled and self._tb:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")

    def write_text(self, tag: str, step: int, text: str) -> None:
        if self.enabled and self._tb:
            self._tb.add_text(tag, text, step)

    def progress(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._mirror:
            self._mirror.push()
            self._mirror.cleanup()
            self._mirror = None

    def flush(self) -> None:
        """A remote work_dir: uploads what changed now (local files are always up to date)."""
        self._sync(force=True)

    def _sync(self, force: bool = False) -> None:
        """A remote work_dir: uploads what changed when forced or `sync_every_s` s after the last upload."""
        if self._mirror is None or not (force or time.monotonic() - self._last_sync >= self.sync_every_s):
            return
        if self._tb:
            self._tb.flush()
        self._mirror.push()
        self._last_sync = time.monotonic()


def format_duration(seconds: float) -> str:
    """'4m05s' under an hour, else '2h07m'."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def steps_per_second(steps: int, elapsed: float, excluded: float = 0.0) -> float | None:
    """Training steps per second: `steps` steps in `elapsed` s of wall time, of which `excluded`
    s were spent outside training steps (evals); None when there is nothing to measure."""
    busy = elapsed - excluded
    return steps / busy if steps > 0 and busy > 0 else None


class StepTimer:
    """Wall-clock throughput of training steps only.

    The log window (steps since the last `window`) and the ETA leave out time handed to
    `exclude` (evals inside the loop) and the run's start-up: its first step, which includes
    compilation, and the first checkpoint save (orbax saves the first step, compiling its
    slicing). Both are timed from `started()` on; the ETA is None before.
    `waited` counts time the loop spent blocked on the input pipeline: `window()` also sets
    `data_wait_fraction`, that time's share of the window (0 when the device is the bottleneck:
    steps are dispatched asynchronously, so the next batch is read while the device computes).
    `clock` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._window_start = clock()
        self._window_steps = 0
        self._window_excluded = 0.0
        self._window_waited = 0.0
        self.data_wait_fraction = 0.0
        self._steady_start: float | None = None
        self._steady_steps = 0
        self._steady_excluded = 0.0

    def step(self) -> None:
        """One training step was dispatched."""
        self._window_steps += 1
        if self._steady_start is not None:
            self._steady_steps += 1

    def waited(self, seconds: float) -> None:
        """The loop spent `seconds` waiting for the next batch."""
        self._window_waited += seconds

    def started(self) -> None:
        """Start-up (compilation, first step, first save) is over: timing starts afresh now."""
        now = self.clock()
        self._window_start, self._window_steps, self._window_excluded = now, 0, 0.0
        self._window_waited = 0.0
        self._steady_start, self._steady_steps, self._steady_excluded = now, 0, 0.0

    def exclude(self, seconds: float) -> None:
        """`seconds` of the current window were not training (an eval): leave them out."""
        self._window_excluded += seconds
        if self._steady_start is not None:
            self._steady_excluded += seconds

    def window(self) -> float:
        """Seconds per training step since the last call (excluded time left out); starts a new window."""
        now = self.clock()
        busy = now - self._window_start - self._window_excluded
        rate = steps_per_second(self._window_steps, now - self._window_start, self._window_excluded)
        step_time = 1.0 / rate if rate else now - self._window_start
        self.data_wait_fraction = min(self._window_waited / busy, 1.0) if busy > 0 else 0.0
        self._window_start, self._window_steps, self._window_excluded = now, 0, 0.0
        self._window_waited = 0.0
        return step_time

    def eta(self, remaining_steps: int) -> float | None:
        """Seconds until `remaining_steps` more steps are done, at the steady rate since
        `started()` (evals excluded); None until a step after start-up was timed."""
        if self._steady_start is None:
            return None
        rate = steps_per_second(self._steady_steps, self.clock() - self._steady_start, self._steady_excluded)
        return remaining_steps / rate if rate else None


def format_progress(step: int, num_steps: int, metrics: Mapping[str, float], *, examples_per_sec: float | None,
                    eta: float | None, examples_seen: int, epochs: Mapping[str, float] | None = None,
                    skipped: Mapping[str, int] | None = None, first_step_sec: float | None = None) -> str:
    """The one-line training progress report.

    `epochs`: {task: epochs of it read so far} when the dataset size is known (one task: just
    the number); `skipped`: bad-data skip counts by reason, shown when any is non-zero;
    `first_step_sec`: on the run's first line, the first step's time (compilation included)
    replaces ex/s and the ETA, which would be meaningless.
    """
    parts = [f"step {step}/{num_steps} loss {metrics['loss']:.4f}"
             + (f" acc {metrics['token_accuracy']:.3f}" if "token_accuracy" in metrics else "")
             + f" lr {metrics['learning_rate']:.2e}"]
    if first_step_sec is not None:
        parts.append(f"first step {first_step_sec:.1f}s (incl. compilation)")
    elif examples_per_sec is not None:
        parts.append(f"{examples_per_sec:,.0f} ex/s" + (f" | MFU {metrics['mfu']:.1%}" if "mfu" in metrics else ""))
        if metrics.get("data_wait_fraction", 0.0) >= 0.05:  # input-bound: say so where it is seen
            parts.append(f"waiting for data {metrics['data_wait_fraction']:.0%} of the time")
    seen = f"{examples_seen:,} examples"
    if epochs:
        seen += (f" ({next(iter(epochs.values())):.2f} epochs)" if len(epochs) == 1 else
                 " (epochs: " + ", ".join(f"{k} {v:.2f}" for k, v in epochs.items()) + ")")
    parts.append(seen)
    bad = {k: int(v) for k, v in (skipped or {}).items() if v}
    if bad:
        parts.append(f"skipped {sum(bad.values()):,}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(bad.items())))
    if first_step_sec is None:
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA ?")
    return " | ".join(parts)
