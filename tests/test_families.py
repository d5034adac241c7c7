"""The model-family interface: one registry, model gin files that select their family, and
generic code that never dispatches on the model type."""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

import gin
import pytest

from conftest import REPO_ROOT, tiny_config
from simvlm_jax import partitioning, train
from simvlm_jax.models import coca, registry, simvlm
from simvlm_jax.models.family import ModelFamily

PACKAGE = os.path.join(REPO_ROOT, "simvlm_jax")


def test_registry_is_the_one_list_of_families():
    assert registry.names() == ["coca", "flamingo", "mplug", "simvlm"]
    for name in registry.names():
        cls = registry.get(name)
        assert issubclass(cls, ModelFamily) and cls.name == name
        assert registry.by_export_type(cls.export_type) is cls
        assert registry.by_config_name(cls.config_cls.__name__) is cls
    with pytest.raises(ValueError, match=r"unknown model family 'blip'; choose one of \['coca', 'flamingo', 'mplug', "
                                         r"'simvlm'\]"):
        registry.get("blip")
    with pytest.raises(ValueError, match="unknown model type 'BLIP'"):
        registry.by_export_type("BLIP")


def test_family_of_a_config_a_module_or_a_family():
    cfg = tiny_config("coca")
    fam = registry.family_of(cfg)
    assert isinstance(fam, coca.CoCaFamily) and fam.config is cfg and isinstance(fam.module, coca.CoCa)
    assert registry.family_of(fam) is fam
    assert registry.family_of(coca.CoCa(cfg)) == fam and hash(registry.family_of(coca.CoCa(cfg))) == hash(fam)
    assert registry.family_of(tiny_config()) != registry.family_of(tiny_config(width=64))
    with pytest.raises(TypeError, match="not a registered model family"):
        registry.family_of(object())
    with pytest.raises(TypeError, match="SimVLMFamily needs a SimVLMConfig, got a CoCaConfig"):
        simvlm.SimVLMFamily(cfg)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "gin", "models", "*.gin"))),
                         ids=os.path.basename)
def test_every_model_gin_file_selects_its_family(path, clean_gin):
    gin.parse_config_files_and_bindings([path], [], skip_unknown=True)
    fam = registry.model_family()
    assert os.path.basename(path).startswith(fam.name)
    assert fam.config == fam.config_cls()  # the gin bindings configured it


def test_binding_another_familys_config_is_an_error(clean_gin):
    gin.parse_config_files_and_bindings([os.path.join(REPO_ROOT, "gin", "models", "coca_tiny.gin")],
                                        ["SimVLMConfig.width = 64"], finalize_config=False)
    with pytest.raises(ValueError, match=r"binds SimVLMConfig\.width but selects model_family\.name='coca' "
                                         r"\(CoCaConfig\)"):
        registry.model_family()


def test_trainer_arguments_are_checked():
    mesh = partitioning.make_mesh(data=8)
    opt = train.make_optimizer(10)
    with pytest.raises(ValueError, match=r"\['temperature'\] are not terms of the coca objective; its terms are "
                                         r"\['caption', 'contrastive'\]"):
        train.Trainer(tiny_config("coca"), mesh, opt, loss_weights={"temperature": 1.0})
    with pytest.raises(ValueError, match="not terms of the simvlm objective; its terms are none"):
        train.Trainer(tiny_config(), mesh, opt, loss_weights={"caption": 1.0})
    with pytest.raises(ValueError, match="train.microbatches=0 must be >= 1"):
        train.Trainer(tiny_config(), mesh, opt, microbatches=0)
    trainer = train.Trainer(tiny_config("coca"), mesh, opt, loss_weights={"caption": 0.5})
    assert trainer.loss_weights == {"contrastive": 1.0, "caption": 0.5}


def _python_files():
    return sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))


def test_no_model_type_dispatch_outside_models():
    """The trainer, decoding, eval, zero-shot, export, FLOPs and benchmarks use only the family
    interface: no isinstance checks against a family's classes outside simvlm_jax/models/."""
    names = {n for f in registry.FAMILIES.values() for n in (f.config_cls.__name__, f.module_cls.__name__)}
    modules = "|".join(sorted({f.module_cls.__module__.rsplit(".", 1)[1] for f in registry.FAMILIES.values()}))
    assert {"coca", "simvlm", "mplug"} <= set(modules.split("|"))
    hits = []
    for path in _python_files():
        if os.sep + "models" + os.sep in path:
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                text = ast.unparse(node.args[1])
                if any(re.search(rf"\b{n}\b", text) for n in names) or re.search(rf"\b({modules})\.", text):
                    hits.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not hits, hits


def _module_imports(path: str) -> set[str]:
    """simvlm_jax modules imported at module level (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("simvlm_jax"):
                out.update(f"{sub.module}.{a.name}" for a in sub.names)
                out.add(sub.module)
            elif isinstance(sub, ast.Import):
                out.update(a.name for a in sub.names if a.name.startswith("simvlm_jax"))
    return out


def test_no_import_cycles():
    modules = {}
    for path in _python_files():
        rel = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
        modules[rel.removesuffix(".__init__")] = path
    graph = {m: {d for d in _module_imports(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_decoding_and_the_trainer_import_without_tensorflow():
    """Special token ids live in a constants module: decoding (and the Trainer, the benchmarks)
    never load TensorFlow."""
    code = ("import sys; import simvlm_jax.decoding, simvlm_jax.train, simvlm_jax.benchmark, simvlm_jax.caption; "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
