"""Training metrics to stdout, `<work_dir>/metrics.jsonl` and TensorBoard; process 0 only."""
from __future__ import annotations

import json
import os
import sys
import time

import jax


class MetricWriter:
    def __init__(self, work_dir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.work_dir = work_dir
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        os.makedirs(work_dir, exist_ok=True)
        self._jsonl = open(os.path.join(work_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            # Lazy: tensorboardX imports PyTorch whenever it is installed (seconds, for every CLI).
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (loads PyTorch)
            self._tb = SummaryWriter(os.path.join(work_dir, "tensorboard"))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def write_config(self, gin_config: str, mesh_shape: dict, num_params: int) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.work_dir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(gin_config)
        if self._tb:
            self._tb.add_text("config", f"mesh {mesh_shape}, {num_params:,} params\n\n```\n{gin_config}\n```")

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
