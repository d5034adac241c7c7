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



@gin.configurable
def make_manager(work_dir: str, save_every: int = 500, keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager saving every `save_every` steps (and the first step of a run),
    keeping the last `keep` and every `keep_every`-th step forever, if set. Saves are
    asynchronous: training continues while orbax writes."""
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
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any | None,
            step: int | None = None) -> tuple[Any, int] | None:
    """Restores the latest (or given) step into `abstract_state`'s shapes and shardings.

    The shardings come from the *current* mesh, so a checkpoint saved on one
    mesh restores onto another. Returns (state, step) or None if there is none.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
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


