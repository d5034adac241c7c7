"""orbax checkpoints of the train state together with the grain iterator position.

Layout: `<work_dir>/checkpoints/<step>/{state,data}`. `state` is the sharded
TrainState (every process writes its own shards); `data` holds each process's
grain iterator state, so a resumed run continues with exactly the next batch.
orbax writes to a temporary directory and renames it when complete, so an
interrupted save never leaves a half checkpoint that would be restored.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import gin
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from simvlm_jax import host_memory
from simvlm_jax.cli import UserError


@gin.configurable
def make_manager(work_dir: str, save_every: int = 500, keep: int = 3, keep_every: int | None = None,
                 async_save: bool | None = None) -> ocp.CheckpointManager:
    """CheckpointManager saving every `save_every` steps (and the first step of a run),
    keeping the last `keep` and every `keep_every`-th step forever, if set.

    `async_save`: training continues while orbax writes. None (the default) means asynchronous
    on accelerators and synchronous on CPU devices: orbax copies accelerator arrays to host
    memory before returning, but CPU arrays it writes in place, so the next step cannot donate
    them and allocates a second train state (CoCa-B/32: +3 GB of host memory during the save).
    """
    if async_save is None:
        async_save = jax.devices()[0].platform != "cpu"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, keep_period=keep_every,
        enable_async_checkpointing=async_save, create=True)
    directory = os.path.join(work_dir, "checkpoints")
    if "://" not in directory:  # local path; gs:// etc. go to orbax as they are
        directory = os.path.abspath(directory)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None,
         force: bool = False) -> bool:
    """Saves if the manager's policy (or `force`) says so; returns whether it saved.
    A step that is already saved is not saved again."""
    if step in manager.all_steps():
        return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:  # tensorstore's writer threads keep what they free in their malloc arenas
        host_memory.release_freed_memory()
    return saved


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any | None,
            step: int | None = None) -> tuple[Any, int] | None:
    """Restores the latest (or given) step into `abstract_state`'s shapes and shardings.

    The shardings come from the *current* mesh, so a checkpoint saved on one
    mesh restores onto another. Returns (state, step) or None if there is none.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    _check_same_model(manager, step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    saved_items = _saved_items(manager, step)
    if data_iterator is not None and "data" in saved_items:
        own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if (epath.Path(manager.directory) / str(step) / "data" / own).exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        else:  # saved with another process count: model state resumes, data restarts
            logging.warning("Checkpoint %d has no data-iterator state for %s (saved with a different "
                            "process count); the input pipeline starts from the beginning.", step, own)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step


def _saved_items(manager: ocp.CheckpointManager, step: int) -> set[str]:
    path = epath.Path(manager.directory) / str(step)
    return {p.name for p in path.iterdir()} if path.exists() else set()




def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/decoder/...': shape} of a state pytree or orbax's saved-tree metadata."""
    def name(key: Any) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ())
            for path, leaf in leaves}


def shape_differences(saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                      limit: int = 3) -> str | None:
    """A short description of how two {path: shape} maps differ (None: they match)."""
    changed = [k for k in expected if k in saved and saved[k] != expected[k]]
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    if not (changed or missing or extra):
        return None
    parts = []
    if changed:
        parts.append(f"{len(changed)} with other shapes (e.g. {changed[0]}: saved "
                     f"{saved[changed[0]]}, this config {expected[changed[0]]})")
    if missing:
        parts.append(f"{len(missing)} not in the checkpoint (e.g. {', '.join(missing[:limit])})")
    if extra:
        parts.append(f"{len(extra)} only in the checkpoint (e.g. {', '.join(extra[:limit])})")
    return "; ".join(parts)


def _check_same_model(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Raises a one-line UserError when the saved state is not this config's (another model
    or size in the same WORK_DIR), instead of orbax's tree dump."""
    path = epath.Path(manager.directory) / str(step) / "state"
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns about an optional metadata file
    try:
        metadata = ocp.StandardCheckpointer().metadata(path)
    except Exception:  # pylint: disable=broad-except  # no metadata: let orbax restore decide
        return
    finally:
        absl_log.setLevel(level)
    saved = _leaf_shapes(getattr(metadata, "item_metadata", metadata))
    expected = _leaf_shapes(abstract_state)
    # Name the parameters that differ; the optimizer state differs along with them.
    diff = shape_differences(*({k: v for k, v in d.items() if k.startswith("params/")} for d in (saved, expected))) \
        or shape_differences(saved, expected)
    if diff:
        work_dir = os.path.dirname(str(manager.directory))
        raise UserError(
            f"the checkpoint at step {step} in WORK_DIR={work_dir} is of another model or config"
            f"{_saved_family(work_dir)}: "
            f"of its arrays, {diff}. Use a new WORK_DIR (or delete {manager.directory}) to start "
            f"fresh, or train with the config it was made with ({os.path.join(work_dir, 'config.gin')})")


def _saved_family(work_dir: str) -> str:
    """' (trained with model_family.name = ...)' from the run's config.gin, if it says."""
    try:
        with epath.Path(work_dir, "config.gin").open() as f:
            line = next((l.strip() for l in f if l.startswith("model_family.name")), None)
    except OSError:
        return ""
    return f" (trained with {line})" if line else ""
