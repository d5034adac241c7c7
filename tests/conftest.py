"""Shared test setup: 8 simulated CPU devices, a tiny model config, a small built-in dataset."""
from __future__ import annotations

import os

# Must happen before anything imports jax (pytest imports conftest.py first).
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# The test models are tiny, so compile time dominates: skip LLVM's optimizations
# (2-3x faster compiles on CPU; numerics unchanged). Set the flag yourself to override.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import gin  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO_ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

# CPU-sized configs of every model family (tests override fields as they need).
TINY = {
    # 2-head width-32 Transformer, 1 encoder + 1 decoder layer, 32 px images cut into
    # 16 px patches (4 image tokens), linear patch stem.
    "simvlm": dict(vocab_size=256, width=32, num_heads=2, mlp_dim=64, encoder_layers=1, decoder_layers=1,
                   image_size=32, patch_size=16, stem_stages=0, stem_width=32, stem_units=(1,),
                   max_prefix_len=8, max_target_len=10, dtype="float32", param_dtype="float32"),
    # ViT 1 x width 32 on 4 patches, 1 unimodal + 1 multimodal text layer, 4 pooler queries.
    "coca": dict(vocab_size=64, image_size=32, patch_size=16, encoder_width=32, encoder_layers=1, encoder_heads=2,
                 encoder_mlp_dim=64, decoder_width=32, unimodal_layers=1, multimodal_layers=1, decoder_heads=2,
                 decoder_mlp_dim=64, embed_dim=16, n_queries=4, max_text_len=8),
}

def compile_cache_env() -> dict[str, str]:
    """Environment for CLI subprocesses to share JAX's persistent compilation cache: many run the
    same tiny model (the docs commands, a run and its resume), and a cache hit halves a 2-step
    run. tests/run.sh makes one fresh directory per test run (SIMVLM_TEST_COMPILE_CACHE); tests
    that check what the compiler says (tests/test_startup.py) must not use it."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = os.environ.get("SIMVLM_TEST_COMPILE_CACHE") or tempfile.mkdtemp(prefix="simvlm_jax_cache")
    return {"JAX_COMPILATION_CACHE_DIR": _CACHE_DIR, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


_CACHE_DIR = None
DATA = dict(num_train=200, num_heldout=40, num_text=300, samples_per_shard=100)
DATA_IMAGE_SIZE = 32


def tiny_config(family: str = "simvlm", /, **overrides):
    """The tiny config of a model family (`TINY[family]`) with `overrides`."""
    from simvlm_jax.models import registry
    return registry.get(family).config_cls(**{**TINY[family], **overrides})


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@dataclasses.dataclass(frozen=True)
class Dataset:
    data_dir: str
    vocab_path: str
    captions: tuple[str, ...]   # train captions, in shard order
    text_lines: tuple[str, ...]  # non-empty lines of the text corpus

    def vocab(self):
        from simvlm_jax.data import tokenizer
        return tokenizer.get_vocabulary(self.vocab_path)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Dataset:
    """The built-in synthetic data (2 train shards of 100, 40 held-out, 300 text docs) + SentencePiece."""
    from simvlm_jax.data import sources, synthetic, tokenizer
    data_dir = str(tmp_path_factory.mktemp("builtin_data"))
    synthetic.generate(data_dir, image_size=DATA_IMAGE_SIZE, **DATA)
    lines = []
    for path in sources.expand_paths(os.path.join(data_dir, "text", "*.txt")):
        with open(path, encoding="utf-8") as f:
            lines.extend(line.strip() for line in f if line.strip())
    src = sources.TarShardSource(os.path.join(data_dir, "train", "*.tar"))
    captions = [src[i]["txt"].decode("utf-8") for i in range(len(src))]
    vocab_path = tokenizer.train_sentencepiece(lines + captions, os.path.join(data_dir, "spm.model"),
                                               vocab_size=256)
    return Dataset(data_dir, vocab_path, tuple(captions), tuple(lines))


@pytest.fixture
def clean_gin():
    """Clears gin before and after a test that binds gin parameters."""
    gin.clear_config()
    yield
    gin.clear_config()


def register_builtin(ds: Dataset, image_size: int = DATA_IMAGE_SIZE, max_prefix_len: int = 8,
                     max_target_len: int = 10, **kwargs) -> str:
    """Registers the builtin tasks/mixture over `ds` (no gin needed); returns the mixture name."""
    from simvlm_jax.data import tasks
    return tasks.register_builtin(ds.data_dir, image_size=image_size, max_prefix_len=max_prefix_len,
                                  max_target_len=max_target_len, vocabulary=ds.vocab(), **kwargs)


# The longest test files (minutes on 2 cores), started first: `tests/run.sh` gives each file to one
# of two workers (--dist loadfile) in collection order, so a long file collected last would run
# alone at the end. Longest first keeps both workers busy to the end.
LONGEST_FIRST = ("test_scaleout.py", "test_docs.py", "test_coca_train.py", "test_launch_local.py",
                 "test_mplug_train.py", "test_mplug_objectives.py", "test_open_clip_e2e.py", "test_flamingo_family.py", "test_flops.py", "test_sharding_equivalence.py",
                 "test_flamingo_model.py",
                 "test_train.py", "test_coca_cli.py")


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable sort
