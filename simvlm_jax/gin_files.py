"""Where the built-in gin configs live (stdlib only: cheap to import anywhere).

The configs are kept in the repository's top-level `gin/` directory (`gin/demo.gin`,
`gin/models/*.gin`, `gin/data/*.gin`, `gin/runs/*.gin`). setup.py ships that tree inside
the package as `simvlm_jax/configs/`, so after a plain `pip install .` they sit next to
this module; in a checkout (or an editable install, whose code stays in the checkout)
there is no `simvlm_jax/configs/` and the repository's `gin/` is used.
"""
from __future__ import annotations

import os
from typing import Iterable

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The installed copy: setup.py maps gin/ to the data-only package simvlm_jax.configs.
PACKAGED_GIN_DIR = os.path.join(_PACKAGE_DIR, "configs")
# The checkout's copy. (In an installed package this would be site-packages/gin, which is
# gin-config's own package, so it only counts when it holds our configs.)
REPO_GIN_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "gin")
_MARKER = "demo.gin"


def gin_dir() -> str:
    """The directory holding the built-in gin files (demo.gin, models/, data/, runs/).

    The packaged copy (simvlm_jax/configs) when installed with `pip install .`, else the
    repository's gin/ (checkout or editable install). If neither holds demo.gin, the
    packaged path, so that error messages name where the files were expected."""
    for d in (PACKAGED_GIN_DIR, REPO_GIN_DIR):
        if os.path.isfile(os.path.join(d, _MARKER)):
            return d
    return PACKAGED_GIN_DIR


def resolve(path: str, search_paths: Iterable[str] = ()) -> str | None:
    """The gin file `path` names, or None if there is none.

    Tried in order: `path` itself (absolute, or relative to the working directory), then
    `path` under gin_dir() and under each of `search_paths`. A path spelled as in the README,
    `gin/demo.gin`, also resolves from any directory: a leading `gin/` is dropped under
    gin_dir()."""
    dirs = [gin_dir(), *search_paths]
    candidates = [path] + [os.path.join(d, path) for d in dirs]
    norm = os.path.normpath(path)
    prefix = "gin" + os.sep
    if not os.path.isabs(norm) and norm.startswith(prefix):
        candidates.append(os.path.join(gin_dir(), norm[len(prefix):]))
    return next((c for c in candidates if os.path.isfile(c)), None)
