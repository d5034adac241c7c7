"""Command line: `python -m simvlm_jax.main --gin_file=F.gin [--gin.X=V ...] --mode=train`.

Modes (comma-separated, run in order in one process): prepare, train, eval, export.
  prepare  build the built-in synthetic data + SentencePiece model (skipped if present)
  train    pretrain, resuming from the latest checkpoint in WORK_DIR
  eval     zero-shot captioning on the eval split (latest checkpoint, or an export)
  export   params-only inference bundle from the latest checkpoint
Every setting lives in gin; `--gin.NAME=VALUE` overrides one binding. With
`--print_json`, the last stdout line is one JSON object summarizing the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Sequence

import flax

from simvlm_jax import distributed, experiment
from simvlm_jax.cli import UserError, add_gin_args, check_required_macros, load_gin, one_line, split_gin_args

MODES = ("prepare", "train", "eval", "export")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m simvlm_jax.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", help=f"comma-separated subset of {','.join(MODES)}")
    add_gin_args(parser)
    parser.add_argument("--multihost", action="store_true",
                        help="multi-process start-up (simvlm_jax.distributed): coordinator, process count and "
                             "id from the three flags below, or found under SLURM, a JobSet or on TPU VMs")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--init_timeout", type=int, default=900,
                        help="seconds to wait for every process to reach the coordinator (JAX's default: 300)")
    parser.add_argument("--heartbeat_timeout", type=int, default=100,
                        help="seconds without a peer's heartbeat after which the run exits non-zero")
    parser.add_argument("--print_json", action="store_true", help="print a JSON summary as the last line")
    args, rest = parser.parse_known_args(argv)
    bindings, unknown = split_gin_args(rest)
    if unknown:
        raise UserError(f"unknown argument(s): {' '.join(unknown)} (see --help)")
    if not args.gin_file:
        raise UserError("no --gin_file given; e.g. --gin_file=gin/demo.gin")
    modes = [m for m in args.mode.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--mode={args.mode!r}: unknown mode(s) {bad}; choose from {','.join(MODES)}")
    args.modes = modes
    return args, bindings


def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, init_timeout: int = 900, heartbeat_timeout: int = 100) -> None:
    """Multi-process start-up: simvlm_jax.distributed finds the peers, refuses settings that would
    hang and logs who this process is; CPU processes talk through gloo (used by the tests)."""
    distributed.initialize(coordinator_address, num_processes, process_id, init_timeout_s=init_timeout,
                           heartbeat_timeout_s=heartbeat_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, bindings = parse_args(argv)
        # force: an imported library (TF/absl) may already have put a handler on the root logger.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", force=True)
        for noisy in ("absl", "orbax", "jax._src"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.multihost or args.coordinator_address:
            init_distributed(args.coordinator_address, args.num_processes, args.process_id,
                             args.init_timeout, args.heartbeat_timeout)
        load_gin(args.gin_file, bindings, args.gin_search_path)
        check_required_macros()
        t0 = time.time()
        summary = experiment.run(args.modes)
        summary["wall_time_sec"] = round(time.time() - t0, 1)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("SIMVLM_DEBUG"):
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except flax.errors.ScopeParamShapeError as e:
        # Parameters built for another config (e.g. a model gin that does not select its family).
        if os.environ.get("SIMVLM_DEBUG"):
            raise
        first = str(e).split("(https://")[0]
        print(f"error: {one_line(first)}: the parameters do not fit the model config; check that the "
              f"model gin file (it sets model_family.name and the config) matches the checkpoint in "
              f"WORK_DIR (see WORK_DIR/config.gin) or train.init_from, or use a new WORK_DIR",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError, FloatingPointError) as e:
        # Raised by our own checks (bad config value, a diverged run): one line naming the
        # setting. Raised inside JAX/flax/numpy (shape errors, bugs): the traceback.
        # SIMVLM_DEBUG=1 always shows the traceback.
        if os.environ.get("SIMVLM_DEBUG") or not raised_by_simvlm(e):
            raise
        msg = one_line(str(e))
        print(f"error: {type(e).__name__}: {msg}" if isinstance(e, TypeError) else f"error: {msg}",
              file=sys.stderr)
        return 2
    if args.print_json:
        print(json.dumps(summary, default=_json_default))
    else:
        for key in ("checkpoint_dir", "eval_dir", "report", "export_dir"):
            if summary.get(key):
                print(f"{key}: {summary[key]}")
    return 0


def raised_by_simvlm(e: BaseException) -> bool:
    """Whether `e` was raised by simvlm_jax's own code (a deliberate message for the user),
    not inside a library it called."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR + os.sep)


def _json_default(x: Any):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


if __name__ == "__main__":
    sys.exit(main())
