"""What every command line shares: `--gin_file` / `--gin.NAME=VALUE` parsing, loading gin
with one-line errors, and the user-error convention (one line `error: ...`, exit code 2).

A CLI module imports the modules whose configurables its gin files may bind, then calls
`load_gin`; gin files are found as given, in the built-in configs (`gin_files.gin_dir()`)
and in any extra search paths.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

import gin

from simvlm_jax import gin_files

GIN_DIR = gin_files.gin_dir()


class UserError(Exception):
    """A mistake in the command line or config; printed as one line, exit code 2."""


def add_gin_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--gin_file (repeatable) and --gin_search_path; `--gin.NAME=VALUE` overrides are left in
    the unparsed arguments for `split_gin_args`."""
    parser.add_argument("--gin_file", action="append", default=[], required=required,
                        help="gin file(s); repeatable; relative to the working directory or the built-in "
                             f"configs ({GIN_DIR})")
    parser.add_argument("--gin_search_path", action="append", default=[],
                        help="extra directories for gin files/includes")


def split_gin_args(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`NAME=VALUE` bindings of the `--gin.NAME=VALUE` items, the other items)."""
    bindings, unknown = [], []
    for item in rest:
        if item.startswith("--gin."):
            if "=" not in item:
                raise UserError(f"gin override {item!r} needs a value: --gin.NAME=VALUE")
            bindings.append(item[len("--gin."):])
        else:
            unknown.append(item)
    return bindings, unknown


def load_gin(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
             skip_unknown: bool = False) -> None:
    """Parses gin files + bindings, turning gin's errors into one-line UserErrors.

    Import the modules whose configurables the config binds first. `skip_unknown` ignores
    bindings of configurables that are not registered (e.g. benchmarks that import only the
    model and trainer, not the data stack)."""
    for p in [GIN_DIR, *search_paths]:
        gin.add_config_file_search_path(p)
    resolved = []
    for f in files:
        found = gin_files.resolve(f, search_paths)
        if found is None:
            raise UserError(f"gin file not found: {f} (looked in the working directory, {GIN_DIR}"
                            f"{''.join(', ' + p for p in search_paths)})")
        resolved.append(found)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs an ERROR for each include search-path miss
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False,
                                            skip_unknown=skip_unknown)
    except (ValueError, KeyError, SyntaxError, IOError) as e:
        msg = str(e).strip().splitlines()
        text = " ".join(line.strip() for line in msg if line.strip())[:400]
        bad = next((b for b in bindings if b.split("=", 1)[0].strip() in text), None)
        where = f" (from --gin.{bad})" if bad else ""
        raise UserError(f"bad gin config{where}: {text}") from None
    finally:
        root.setLevel(level)
