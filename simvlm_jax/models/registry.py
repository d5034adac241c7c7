"""The one list of model families, and how gin selects one.

A model gin file (gin/models/*.gin) names its family with `model_family.name` and
configures it through the family's config class (`SimVLMConfig.*`, `CoCaConfig.*`).
Adding a family = its own module(s) with a `ModelFamily` subclass + one line below.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin

from simvlm_jax.models import coca, family, flamingo, mplug, simvlm

ModelFamily = family.ModelFamily

FAMILIES: dict[str, type[ModelFamily]] = {f.name: f for f in (
    simvlm.SimVLMFamily,
    coca.CoCaFamily,
    mplug.MPLUGFamily,
    flamingo.FlamingoFamily,
)}

_BY_CONFIG = {f.config_cls: f for f in FAMILIES.values()}
_BY_MODULE = {f.module_cls: f for f in FAMILIES.values()}


def names() -> list[str]:
    return sorted(FAMILIES)


def get(name: str) -> type[ModelFamily]:
    """The family class registered under `name` ('simvlm', 'coca', ...)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {names()}")
    return FAMILIES[name]


def by_export_type(export_type: str) -> type[ModelFamily]:
    """The family whose exports are stored with model type `export_type` ('SimVLM', 'CoCa')."""
    for f in FAMILIES.values():
        if f.export_type == export_type:
            return f
    raise ValueError(f"unknown model type {export_type!r} in the export; known: "
                     f"{sorted(f.export_type for f in FAMILIES.values())}")


def by_config_name(class_name: str) -> type[ModelFamily] | None:
    """The family whose config class is called `class_name` (None if none is)."""
    return next((f for f in FAMILIES.values() if f.config_cls.__name__ == class_name), None)


def family_of(obj: Any) -> ModelFamily:
    """The family instance of a config, a flax module of a family, or a family itself."""
    if isinstance(obj, ModelFamily):
        return obj
    if type(obj) in _BY_CONFIG:
        return _BY_CONFIG[type(obj)](obj)
    if isinstance(obj, nn.Module) and type(obj) in _BY_MODULE:
        return _BY_MODULE[type(obj)](obj.config)
    raise TypeError(f"{type(obj).__name__} is not a registered model family's config or module "
                    f"(families: {names()})")


@gin.configurable
def model_family(name: str = "simvlm") -> ModelFamily:
    """The family a gin config selects, with its gin-configured config.

    Every gin/models/*.gin binds `model_family.name`. Bindings of another family's config
    class are a mistake (they would be silently ignored), so they are an error.
    """
    selected = get(name)
    for other in FAMILIES.values():
        bound = gin.get_bindings(other.config_cls) if other is not selected else {}
        if bound:
            raise ValueError(
                f"the gin config binds {other.config_cls.__name__}.{next(iter(bound))} "
                f"but selects model_family.name={name!r} ({selected.config_cls.__name__}); include the "
                f"model gin file of one family, or set model_family.name = {other.name!r}")
    return selected()
