"""What every command line shares: `--gin_file` / `--gin.NAME=VALUE` parsing, loading gin
with one-line errors, and the user-error convention (one line `error: ...`, exit code 2).

A CLI module imports the modules whose configurables its gin files may bind, then calls
`load_gin`; gin files are found as given, in the built-in configs (`gin_files.gin_dir()`)
and in any extra search paths.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import re
from typing import Sequence

import gin
from gin import config as gin_config

from simvlm_jax import gin_files

GIN_DIR = gin_files.gin_dir()


def _never_raises(exists):
    """gin's Python-package file check crashes (TypeError) when an include's first folder is also
    a namespace package, e.g. a `runs/` folder in the working directory for `include
    'runs/pretrain.gin'`; treat that as "not found there" so the search paths are tried."""
    def checked(path: str) -> bool:
        try:
            return exists(path)
        except TypeError:
            return False
    checked.never_raises = True
    return checked


gin_config._FILE_READERS[:] = [  # pylint: disable=protected-access
    (reader, exists if getattr(exists, "never_raises", False) else _never_raises(exists))
    for reader, exists in gin_config._FILE_READERS]  # pylint: disable=protected-access


MAX_ERROR_CHARS = 600  # longer messages are cut: a user reads one line, not a dump


def one_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """The message on one line without gin's 'In call to configurable' addendum, cut to `limit`
    characters (SIMVLM_DEBUG=1 shows the full text with its traceback)."""
    text = " ".join(message.split())
    text = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", "", text)
    return text if len(text) <= limit else text[:limit - 40] + " ... (SIMVLM_DEBUG=1 shows all)"


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
    """Parses gin files, then each `--gin.` binding, turning gin's errors into one-line UserErrors.

    Import the modules whose configurables the config binds first. `skip_unknown` ignores
    bindings of configurables that are not registered (e.g. benchmarks that import only the
    model and trainer, not the data stack). A binding of a macro (`NAME=VALUE`, no dot) that
    no file defines is an error: gin would accept a typo'd `--gin.NUM_STEP=5` silently."""
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
        try:
            gin.parse_config_files_and_bindings(resolved, [], finalize_config=False,
                                                skip_unknown=skip_unknown)
        except (ValueError, KeyError, SyntaxError, IOError) as e:
            raise UserError(f"bad gin config: {_gin_message(e)}") from None
        for binding in bindings:
            _check_macro_defined(binding)
            try:
                gin.parse_config([binding], skip_unknown=skip_unknown)
            except (ValueError, KeyError, SyntaxError, IOError) as e:
                raise UserError(_binding_error(binding, e)) from None
    finally:
        root.setLevel(level)


def _gin_message(e: BaseException, limit: int = 400) -> str:
    lines = str(e).strip().splitlines()
    return " ".join(line.strip() for line in lines if line.strip())[:limit]


def defined_macros() -> list[str]:
    """Names of the gin macros (`NAME = value`) parsed so far."""
    return sorted(name for name, kind in gin_config._CONFIG if kind == "gin.macro")  # pylint: disable=protected-access


def _check_macro_defined(binding: str) -> None:
    name = binding.split("=", 1)[0].strip()
    if "." in name:
        return
    known = defined_macros()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean --gin.{close[0]}=...? " if close else ""
        raise UserError(f"--gin.{binding}: no gin file defines the macro {name}; {hint}"
                        f"the files define {', '.join(known) or 'no macros'}")


def _binding_error(binding: str, e: BaseException) -> str:
    name, _, value = binding.partition("=")
    text = _gin_message(e, limit=240)
    value = value.strip()
    # gin values are Python literals: a bare word is a parse error, not a string.
    if ("parse" in text.lower() or isinstance(e, SyntaxError)) and re.fullmatch(r"[^'\"\[\]{}(),]+", value) \
            and not re.fullmatch(r"[-+.\deE_]+|True|False|None|@.*|%.*", value):
        return (f"--gin.{binding}: gin values are Python literals, so the string needs quotes "
                f"inside the shell's: --gin.{name.strip()}=\"'{value}'\"")
    return f"bad gin binding --gin.{binding}: {text}"


def check_required_macros() -> None:
    """Raises a UserError naming every macro still set to `%gin.REQUIRED` (e.g. WORK_DIR)."""
    missing = [name for name in defined_macros()
               if str(gin_config._CONFIG[(name, "gin.macro")].get("value")) == "%gin.REQUIRED"]  # pylint: disable=protected-access
    if missing:
        raise UserError(f"required setting(s) not set: {', '.join(missing)}; add e.g. "
                        f"`{missing[0]} = ...` to your gin file or pass --gin.{missing[0]}=...")
