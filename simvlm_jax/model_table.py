"""The docs/models.md tables: every gin/models/*.gin config's architecture, exact parameter
count and training FLOPs per example, next to the published sizes.

    python -m simvlm_jax.model_table      # prints both tables (markdown)
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys

import flax.linen as nn
import gin

from simvlm_jax import gin_files, train
from simvlm_jax.models import registry
from simvlm_jax.models.family import ModelFamily, count_params

GIN_MODELS_DIR = os.path.join(gin_files.gin_dir(), "models")

# What each config follows: config -> (published parameter count or None, source).
REFERENCE_COUNTS: dict[str, tuple[float | None, str]] = {
    "simvlm_tiny": (None, "ours (CPU demo)"),
    "simvlm_base": (None, "SimVLM-Base, arXiv 2108.10904 (ViT-B sizes)"),
    "simvlm_large": (None, "SimVLM-Large, arXiv 2108.10904 (ViT-L sizes)"),
    "simvlm_huge": (None, "SimVLM-Huge, arXiv 2108.10904 (ViT-H sizes)"),
    "coca_tiny": (None, "ours (CPU demo)"),
    "coca_base": (383e6, "CoCa-Base, arXiv 2205.01917 Table 1"),
    "coca_large": (787e6, "CoCa-Large, arXiv 2205.01917 Table 1"),
    "coca_2b": (2.1e9, "CoCa, arXiv 2205.01917 Table 1"),
    "coca_ViT-B-32": (253_560_065, "open_clip coca_ViT-B-32 (open_clip_torch 3.3.0)"),
    "coca_ViT-L-14": (638_450_177, "open_clip coca_ViT-L-14 (open_clip_torch 3.3.0)"),
    "mplug_tiny": (None, "ours (CPU demo)"),
    # The paper gives no counts: these are the modules AliceMind's released code builds and
    # uses (tests/test_mplug_model.py derives them and itemizes our difference).
    "mplug_base": (345_455_735, "mPLUG-Base, AliceMind mPLUG code (config_bert_stride3.json, ViT-B/16)"),
    "mplug_large": (565_942_647, "mPLUG-Large, AliceMind mPLUG code (config_bert.json, ViT-L/14)"),
    "flamingo_tiny": (None, "ours (CPU demo)"),
    # The names are nominal ("3B", "9B"); our LMs are LLaMA-style with MPT-1B / LLaMA-7B shapes.
    "flamingo_3b": (None, "OpenFlamingo-3B shapes (ViT-L/14, MPT-1B-sized LM, xattn every layer), arXiv 2308.01390"),
    "flamingo_9b": (None, "OpenFlamingo-9B v1 shapes (ViT-L/14, LLaMA-7B, xattn every 4th), arXiv 2308.01390"),
}


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One gin/models config: its parsed config, exact parameter counts and training FLOPs."""
    name: str
    family: ModelFamily
    num_params: int
    pooler_params: int  # CoCa's attentional poolers + image projection (0 for SimVLM)
    train_flops_per_example: float


def load_model_family(path: str) -> tuple[ModelFamily, tuple[str, ...]]:
    """The family + config a model gin file selects, and the params it freezes
    (`make_optimizer.frozen`); gin is cleared before and after."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([path], [], skip_unknown=True)
        return registry.model_family(), tuple(gin.get_bindings("make_optimizer").get("frozen", ()))
    finally:
        gin.clear_config()


def model_row(path: str) -> ModelRow:
    """Counts and training FLOPs (with the gin's frozen params, e.g. Flamingo's LM) of a config."""
    fam, frozen = load_model_family(path)
    params = nn.meta.unbox(fam.abstract_params())
    return ModelRow(os.path.splitext(os.path.basename(path))[0], fam, count_params(params),
                    count_params(params.get("pooler", {})), fam.train_flops_per_example(frozen))


def model_rows(gin_dir: str = GIN_MODELS_DIR) -> list[ModelRow]:
    """Every gin/models/*.gin config, grouped by family (registry order), each by size."""
    rows = [model_row(p) for p in glob.glob(os.path.join(gin_dir, "*.gin"))]
    order = list(registry.FAMILIES)
    return sorted(rows, key=lambda r: (order.index(r.family.name), r.num_params))


def _fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _size_cells(row: ModelRow) -> list[str]:
    count, source = REFERENCE_COUNTS.get(row.name, (None, "?"))
    no_pool = row.num_params - row.pooler_params
    gflops = row.train_flops_per_example / 1e9
    cells = [f"{row.num_params:,}", f"{no_pool:,}" if row.pooler_params else "—",
             f"{gflops:,.1f}" if gflops >= 10 else f"{gflops:.3f}", source]
    if count is None:
        return cells + ["not stated" if "arXiv" in source else "—", "—"]
    exact = count % 1_000_000 != 0
    dev = f"{100 * (row.num_params - count) / count:+.1f}%"
    if row.pooler_params and not exact:
        dev += f" ({100 * (no_pool - count) / count:+.1f}% w/o poolers)"
    return cells + [f"{int(count):,}" if exact else _fmt_count(count), dev]


def markdown_tables(rows: list[ModelRow]) -> str:
    """The two docs/models.md tables: architecture, then sizes and FLOPs."""
    arch = ["config", "width (enc / dec)", "layers (enc / dec)", "heads", "MLP", "image px / patch",
            "conv stem", "encoder-side tokens", "decoder tokens", "vocab"]
    size = ["config", "params (exact)", "params w/o poolers", "train GFLOPs / example", "follows",
            "reference params", "ours vs reference"]
    out = []
    for head, cells in ((arch, lambda r: r.family.table_cells() + [f"{r.family.config.vocab_size:,}"]),
                        (size, _size_cells)):
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join([f"`{r.name}`", *cells(r)]) + " |" for r in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simvlm_jax.model_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_dir", default=GIN_MODELS_DIR)
    args = parser.parse_args(argv)
    print(markdown_tables(model_rows(args.gin_dir)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
