"""Entry point: `python -m simvlm_jax.launch TARGET ...` (see simvlm_jax/launch/__init__.py)."""
from __future__ import annotations

import sys
from typing import Sequence

from simvlm_jax import gin_files
from simvlm_jax.cli import UserError
from simvlm_jax.launch import common, local, slurm, tpu_vm, xpk

TARGETS = {"tpu-vm": tpu_vm, "xpk": xpk, "slurm": slurm, "local": local}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, bindings = common.parse(argv, TARGETS)
        plan = TARGETS[args.target].plan(args, bindings)
        for f in args.gin_file:  # a typo found here costs nothing; on the cluster, a slice-hour
            if gin_files.resolve(f, []) is None:
                raise UserError(f"gin file not found: {f} (looked in the working directory and {gin_files.gin_dir()})")
        if args.dry_run:
            sys.stdout.write(common.render(plan))
            return 0
        return plan.runner(plan) if plan.runner else common.execute(plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
