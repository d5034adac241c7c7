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
from typing import Any, Sequence

MODES = ("prepare", "train", "eval", "export")
GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class UserError(Exception):
    """A mistake in the command line or config; printed as one line, exit code 2."""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m simvlm_jax.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="train", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--gin_file", action="append", default=[], help="gin file(s); repeatable")
    parser.add_argument("--gin_search_path", action="append", default=[],
                        help=f"extra directories for gin files/includes (always has {GIN_DIR})")
    parser.add_argument("--multihost", action="store_true",
                        help="call jax.distributed.initialize(): auto-detected on TPU VMs and SLURM, "
                             "or from the three flags below")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--print_json", action="store_true", help="print a JSON summary as the last line")
    args, rest = parser.parse_known_args(argv)
    bindings, unknown = [], []
    for item in rest:
        if item.startswith("--gin."):
            if "=" not in item:
                raise UserError(f"gin override {item!r} needs a value: --gin.NAME=VALUE")
            bindings.append(item[len("--gin."):])
        else:
            unknown.append(item)
    if unknown:
        raise UserError(f"unknown argument(s): {' '.join(unknown)} (see --help)")
    modes = [m for m in args.mode.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--mode={args.mode!r}: unknown mode(s) {bad}; choose from {','.join(MODES)}")
    args.modes = modes
    return args, bindings


def _import_configurables(model_only: bool = False) -> None:
    # Importing registers every gin configurable a config may name.
    from simvlm_jax import partitioning, train  # noqa: F401
    from simvlm_jax.models import simvlm  # noqa: F401
    if model_only:
        return
    from simvlm_jax import checkpointing, evaluate  # noqa: F401
    from simvlm_jax.data import pipeline, tasks, tokenizer  # noqa: F401
    from simvlm_jax.models import simvlm  # noqa: F401
    from simvlm_jax import experiment  # noqa: F401


def load_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
             model_only: bool = False) -> None:
    """Parses gin files + bindings, turning gin's errors into one-line UserErrors.

    `model_only` registers just the model/trainer configurables and ignores bindings of
    the others (data, checkpoints, eval), so benchmarks run without TF/grain/seqio."""
    import gin  # pylint: disable=g-import-not-at-top
    _import_configurables(model_only)
    for p in [GIN_DIR, *search_paths]:
        gin.add_config_file_search_path(p)
    if not files:
        raise UserError("no --gin_file given; e.g. --gin_file=gin/demo.gin")
    resolved = []
    for f in files:
        candidates = [f] + [os.path.join(p, f) for p in [GIN_DIR, *search_paths]]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:
            raise UserError(f"gin file not found: {f}")
        resolved.append(found)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs an ERROR for each include search-path miss
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False,
                                            skip_unknown=model_only)
    except (ValueError, KeyError, SyntaxError, IOError) as e:
        msg = str(e).strip().splitlines()
        text = " ".join(line.strip() for line in msg if line.strip())[:400]
        bad = next((b for b in bindings if b.split("=", 1)[0].strip() in text), None)
        where = f" (from --gin.{bad})" if bad else ""
        raise UserError(f"bad gin config{where}: {text}") from None
    finally:
        root.setLevel(level)


def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
    """Multi-process start-up; CPU processes talk through gloo (used by the tests)."""
    import jax  # pylint: disable=g-import-not-at-top
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or "force_host_platform" in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, bindings = parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")
        for noisy in ("absl", "orbax", "jax._src"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.multihost or args.coordinator_address:
            init_distributed(args.coordinator_address, args.num_processes, args.process_id)
        load_gin(args.gin_file, bindings, args.gin_search_path)
        from simvlm_jax import experiment  # pylint: disable=g-import-not-at-top
        t0 = time.time()
        summary = experiment.run(args.modes)
        summary["wall_time_sec"] = round(time.time() - t0, 1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FloatingPointError) as e:
        # Config values rejected by validation name the setting; a diverged run says so.
        # SIMVLM_DEBUG=1 re-raises with the traceback.
        if os.environ.get("SIMVLM_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {msg}" if isinstance(e, TypeError) else f"error: {msg}",
              file=sys.stderr)
        return 2
    if args.print_json:
        print(json.dumps(summary, default=_json_default))
    return 0


def _json_default(x: Any):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


if __name__ == "__main__":
    sys.exit(main())
