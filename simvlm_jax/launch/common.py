"""What every launch target shares: the command line, the plan (files to write, commands to run),
`--dry_run` rendering and execution.

A target turns the parsed arguments into a `Plan`: an ordered list of `File`s and `Command`s.
`--dry_run` prints the plan exactly (commands as copy-pasteable shell, files in full) and runs
nothing; otherwise files are written and commands run in order, stopping at the first failure
with the step's title. `Command.always` steps (deleting a slice) run even after a failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from simvlm_jax.cli import UserError, split_gin_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


@dataclasses.dataclass
class File:
    title: str
    path: str
    content: str
    mode: int = 0o644


@dataclasses.dataclass
class Command:
    title: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    always: bool = False  # run even when an earlier step failed (cleanup)


@dataclasses.dataclass
class Plan:
    target: str
    steps: list = dataclasses.field(default_factory=list)
    # Runs the plan instead of `execute` (the local target supervises its processes itself).
    runner: Callable[["Plan"], int] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def quote(word: str) -> str:
    """shlex.quote, but `--gin.X='v'` reads as "--gin.X='v'" rather than shlex's '"'"' dance."""
    if "'" in word and not re.search(r'[$`\\!]', word):
        return '"' + word.replace('"', '\\"') + '"'
    return shlex.quote(word)


def quote_join(argv: Sequence[str]) -> str:
    return " ".join(quote(a) for a in argv)


def shell_join(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """One copy-pasteable command; a long one gets one `--option` per line, joined with `\\`."""
    words = [(f"{k}=", f"{k}={quote(v)}") for k, v in (env or {}).items()] + [(a, quote(a)) for a in argv]
    line = " ".join(q for _, q in words)
    if len(line) <= 100:
        return line
    out = [[]]
    previous = ""
    for raw, quoted in words:
        # a new line for each --option, and for the program that follows a wrapper's options (srun ... python)
        if out[-1] and (raw.startswith("--") or (previous.startswith("--") and "=" in previous
                                                  and not raw.startswith("-"))):
            out.append([])
        out[-1].append(quoted)
        previous = raw
    return " \\\n    ".join(" ".join(words) for words in out)


def render(plan: Plan) -> str:
    lines = [f"# simvlm_jax.launch {plan.target}: dry run; nothing was run or written"]
    lines += [f"# {n}" for n in plan.notes]
    for i, step in enumerate(plan.steps, 1):
        lines.append("")
        if isinstance(step, File):
            lines.append(f"# {i}. {step.title}: write {step.path}")
            lines.append(f"cat > {shlex.quote(step.path)} <<'EOF'")
            lines.append(step.content.rstrip("\n"))
            lines.append("EOF")
            if step.mode & 0o111:
                lines.append(f"chmod +x {shlex.quote(step.path)}")
        else:
            lines.append(f"# {i}. {step.title}{' (runs even if a step above failed)' if step.always else ''}")
            lines.append(shell_join(step.argv, step.env))
    return "\n".join(lines) + "\n"


def execute(plan: Plan) -> int:
    """Writes the files and runs the commands in order; the first failure stops the rest
    (except `always` steps) and is reported with its title."""
    failed = None
    for i, step in enumerate(plan.steps, 1):
        if failed is not None and not (isinstance(step, Command) and step.always):
            continue
        if isinstance(step, File):
            os.makedirs(os.path.dirname(os.path.abspath(step.path)), exist_ok=True)
            with open(step.path, "w", encoding="utf-8") as f:
                f.write(step.content)
            os.chmod(step.path, step.mode)
            print(f"[launch] {i}. {step.title}: wrote {step.path}", flush=True)
            continue
        print(f"[launch] {i}. {step.title}\n{shell_join(step.argv, step.env)}", flush=True)
        try:
            rc = subprocess.run(step.argv, env={**os.environ, **step.env}, check=False).returncode
        except FileNotFoundError:
            print(f"error: step {i} ({step.title}): {step.argv[0]} is not installed or not on PATH",
                  file=sys.stderr)
            rc = 127
        if rc != 0 and failed is None:
            failed = (i, step.title, rc)
    if failed:
        i, title, rc = failed
        print(f"error: step {i} ({title}) failed with exit code {rc}", file=sys.stderr)
        return 1
    return 0


def add_common_args(p: argparse.ArgumentParser, work_dir_required: bool = True) -> None:
    p.add_argument("--gin_file", action="append", default=[], help="gin file(s) of the run, repeatable")
    p.add_argument("--name", required=True, help="the run's name: lower case letters, digits and '-'")
    p.add_argument("--work_dir", required=work_dir_required,
                   help="the run's WORK_DIR (checkpoints, TensorBoard, metrics, exports), e.g. gs://bucket/run; "
                        "every process must see it (gs:// or a shared filesystem)")
    p.add_argument("--mode", default="train", help="simvlm_jax.main --mode (default train)")
    p.add_argument("--dry_run", action="store_true", help="print every command and file, run nothing")
    p.add_argument("--out_dir", default=None,
                   help="where rendered files (sbatch script, manifest, code archive) are written "
                        "(default launch_out/<name>)")


def main_args(args: argparse.Namespace, bindings: Sequence[str], distributed: Sequence[str]) -> list[str]:
    """The `simvlm_jax.main` arguments every process of the run gets."""
    out = ["-m", "simvlm_jax.main", *(f"--gin_file={f}" for f in args.gin_file), f"--mode={args.mode}"]
    out += [f"--gin.{b}" for b in bindings]
    if args.work_dir:
        out.append(f"--gin.WORK_DIR='{args.work_dir}'")
    return out + list(distributed)


def out_dir(args: argparse.Namespace) -> str:
    return args.out_dir or os.path.join("launch_out", args.name)


def check_common(args: argparse.Namespace, bindings: Sequence[str]) -> None:
    if not NAME_RE.match(args.name):
        raise UserError(f"--name={args.name!r}: use 1-40 lower case letters, digits and '-', starting with a "
                        f"letter (it names the slice / workload / job), e.g. --name=simvlm-base-1")
    if not args.gin_file:
        raise UserError("no --gin_file given; e.g. --gin_file=gin/demo.gin")
    if any(b.startswith("WORK_DIR=") for b in bindings):
        raise UserError("set the run's WORK_DIR with --work_dir=..., not --gin.WORK_DIR (the launcher passes it "
                        "to every process)")
    if args.mode and not set(args.mode.split(",")) <= {"prepare", "train", "eval", "export"}:
        raise UserError(f"--mode={args.mode!r}: choose from prepare,train,eval,export")


def parse(argv: Sequence[str], targets: dict) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m simvlm_jax.launch",
        description="Start a simvlm_jax run on a TPU VM slice (tpu-vm), GKE through xpk or a JobSet (xpk), "
                    "a SLURM cluster (slurm) or N processes on this machine (local). Every option not listed "
                    "here, --gin.NAME=VALUE, goes to simvlm_jax.main. --dry_run prints what would run.")
    sub = parser.add_subparsers(dest="target", metavar="{" + ",".join(targets) + "}")
    for name, module in targets.items():
        p = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        add_common_args(p, work_dir_required=name != "local")
        module.add_args(p)
    if not argv or argv[0] not in targets:
        if argv and argv[0] in ("-h", "--help"):
            parser.parse_args(argv)
        raise UserError(f"the first argument is the target, one of {', '.join(targets)}: e.g. "
                        f"python -m simvlm_jax.launch local --gin_file=gin/demo.gin --name=demo --dry_run")
    args, rest = parser.parse_known_args(argv)
    bindings, unknown = split_gin_args(rest)
    if unknown:
        raise UserError(f"unknown argument(s) for {args.target}: {' '.join(unknown)} "
                        f"(see python -m simvlm_jax.launch {args.target} --help)")
    check_common(args, bindings)
    return args, bindings
