"""The model-family interface: everything the trainer, decoding, evaluation, zero-shot,
export, FLOPs and benchmarks need from a model, and nothing they may assume beyond it.

A family (SimVLM, CoCa, ...) subclasses `ModelFamily` next to its flax module and is
listed once in `models/registry.py`. An instance wraps one config:

    family = registry.family_of(config)          # or of a module, or by name
    family.module.apply({'params': p}, batch)    # the flax.linen module
    family.objective(p, batch, rng, ...)         # training: Objective(value, weight, sums)
    family.encode(p, inputs); family.decode_start / decode_step   # generation, KV cache
    family.embed_images(p, images) / embed_texts(...)    # retrieval (if can_embed)

Capabilities are flags (`can_generate`, `can_embed`), so generic code asks what a
model can do, never which model it is. Methods that run the network are pure
(`params` in, arrays out) and jit-compatible.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from simvlm_jax import losses

Array = jax.Array


class ModelFamily:
    """Base class of a model family; see the module docstring."""

    name: ClassVar[str]                   # registry key: `model_family.name`, `--model`
    export_type: ClassVar[str]            # the model type stored in export bundles
    config_cls: ClassVar[type]            # gin-configurable dataclass (`<ConfigClass>.<field>`)
    module_cls: ClassVar[type[nn.Module]]
    # Default weights of the objective's terms (override with `train.loss_weights`).
    loss_weights: ClassVar[Mapping[str, float]] = {}
    # The objective runs per batch shard (e.g. a contrastive loss under shard_map), so every
    # accumulation microbatch must split evenly over the batch shards.
    per_shard_objective: ClassVar[bool] = False
    can_generate: ClassVar[bool] = False
    can_embed: ClassVar[bool] = False
    can_match: ClassVar[bool] = False   # scores image-text pairs (e.g. an ITM head): retrieval re-ranking
    can_few_shot: ClassVar[bool] = False  # captions with solved examples in its prompt (in-context)

    def __init__(self, config: Any = None):
        self.config = self.config_cls() if config is None else config
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, "
                            f"got a {type(self.config).__name__}")
        self.module = self.module_cls(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # Equal (and hashing alike) for equal configs: jitted functions keyed on a family are reused.
    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.config == self.config

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    # ------------------------------------------------------------------ training

    def dummy_batch(self, batch_size: int = 1) -> dict[str, Array]:
        """The training batch the model reads (names, shapes, dtypes); zeros."""
        raise NotImplementedError

    def random_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`dummy_batch` with random pixels (uint8 features) and random token ids in
        '*_tokens' features (special ids 0-2 excluded), for benchmarks: zeros can run faster
        than real data. SimVLM-style 'prefix_tokens' get text in their first half."""
        vocab = self.config.vocab_size
        host = {k: np.array(v) for k, v in self.dummy_batch(batch_size).items()}
        for k, v in host.items():
            if v.dtype == np.uint8:
                host[k] = rng.integers(0, 256, v.shape, dtype=np.uint8)
            elif k == "prefix_tokens":
                half = v.shape[1] // 2
                v[:, :half] = rng.integers(3, vocab, (batch_size, half))
            elif k.endswith("_tokens"):
                v[:] = rng.integers(3, vocab, v.shape)
        return host

    def init_params(self, rng: Array) -> Any:
        """Boxed (logically annotated) params of a new model."""
        return self.module.init({"params": rng, "dropout": rng}, self.dummy_batch())["params"]

    def abstract_params(self) -> Any:
        """Boxed parameter ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def objective(self, params: Any, batch: Mapping[str, Array], rng: Array, *,
                  loss_weights: Mapping[str, float], mesh: Mesh | None = None,
                  batch_axes: Sequence[str] = (), aux_state: Any = None) -> losses.Objective:
        """Training objective of one (micro)batch (dropout on, `rng` its key); `aux_state` is
        the family's state from `init_aux_state` (read only here)."""
        raise NotImplementedError

    def init_aux_state(self, params: Any, rng: Array) -> Any:
        """State the objective needs besides params and optimizer state (boxed with logical
        axis names, from the boxed new params): EMA ("momentum") params, feature queues
        (`simvlm_jax.momentum`). Checkpointed, sharded and restored with the rest. None: none."""
        return None

    def update_aux_state(self, aux_state: Any, params: Any, aux_outputs: Any) -> Any:
        """The aux state after an optimizer step: `params` are the updated params and
        `aux_outputs` the objective's (all microbatches' rows, in batch order). Not called
        on steps skipped for NaN/Inf."""
        return aux_state

    def check_batch(self, host_batch: Mapping[str, np.ndarray]) -> None:
        """Raises ValueError if a host batch is wrong for this model in a way shapes can't show."""

    # A model's vocabulary may exceed its tokenizer's up to the next multiple of this (the
    # usual padding for fast embedding/logit matmuls, e.g. T5's 32,100 -> 32,128).
    vocab_padding: int = 128

    def extra_token_ids(self) -> tuple[int, ...]:
        """Ids the model uses beyond the tokenizer's pieces (e.g. an MLM [MASK] appended at
        the tokenizer's size); they count as part of the vocabulary in `check_vocabulary`."""
        return ()

    def check_vocabulary(self, vocab: Any) -> None:
        """Raises ValueError if the tokenizer does not fit the model config: sizes (both
        directions, the tokenizer's pieces + `extra_token_ids`) and the special ids the model
        relies on (EOS, pad)."""
        cls = type(self.config).__name__
        size = max([vocab.vocab_size] + [i + 1 for i in self.extra_token_ids()])
        model = self.config.vocab_size
        remake = "make one with `python -m simvlm_jax.data.tokenizer` (pad=0 eos=1 unk=2)"
        if model < size:
            raise ValueError(f"{cls}.vocab_size={model} is smaller than the tokenizer's {size} pieces; "
                             f"set {cls}.vocab_size={size}")
        padded = -(-size // self.vocab_padding) * self.vocab_padding
        if model > padded:
            raise ValueError(f"{cls}.vocab_size={model} but the tokenizer has {size} pieces: ids {size}.."
                             f"{model - 1} are never trained and decode to '⁇'; set {cls}.vocab_size={size} "
                             f"(anything up to {padded} is fine) or use the tokenizer the model was made for")
        if vocab.eos_id != self.text_eos_id:
            raise ValueError(f"the tokenizer's EOS id is {vocab.eos_id} but {self.name} ends texts with id "
                             f"{self.text_eos_id}, so generated captions would never stop; {remake}")
        processor = getattr(vocab, "tokenizer", None)  # SentencePiece's processor, if any
        pad = getattr(processor, "pad_id", None)
        if callable(pad) and pad() != self.pad_id:
            piece = processor.id_to_piece(self.pad_id) if self.pad_id < size else "?"
            raise ValueError(f"the tokenizer has no pad piece at id {self.pad_id} (its pad id is {pad()}; id "
                             f"{self.pad_id} is {piece!r}), but {self.name} pads with id {self.pad_id}; {remake}")

    def tokens_per_example(self) -> int:
        """Image + text tokens one training example feeds the model (for tokens/s)."""
        raise NotImplementedError

    def train_flops_per_example(self, frozen: Sequence[str] = ()) -> float:
        """Analytic training FLOPs of one image-text example (forward + backward), for MFU.
        `frozen`: the optimizer's frozen-param regexes (`train.Optimizer.frozen`), whose weight
        gradients are not computed; a family may count them as trained (3x forward)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One sentence for model cards."""
        raise NotImplementedError

    def table_cells(self) -> list[str]:
        """docs/models.md architecture columns: width, layers, heads, MLP, image px / patch,
        conv stem, encoder-side tokens, decoder tokens."""
        raise NotImplementedError

    @property
    def external_tokenizer(self) -> str | None:
        """The tokenizer type an export records when it ships no tokenizer file (e.g.
        'open_clip': CLIP BPE from open_clip_torch); None: the bundle's own file or none."""
        return None

    # ------------------------------------------------------------------ generation

    @property
    def max_decode_len(self) -> int:
        """Longest caption the decoder can generate (its position table)."""
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        raise NotImplementedError

    @property
    def text_eos_id(self) -> int:
        """The tokenizer's EOS the model was trained with (`eos_id` unless captions end otherwise)."""
        return self.eos_id

    @property
    def start_id(self) -> int:
        """The decoder's first input token (BOS)."""
        return self.config.bos_id

    @property
    def pad_id(self) -> int:
        """Never generated; fills generated sequences after EOS."""
        return self.config.pad_id

    @property
    def cache_batch_axis(self) -> int:
        """Axis of the KV cache's rows (1 when scanned layers add a leading layers axis)."""
        return 1 if self.config.scan_layers else 0

    def prompt_ids(self, vocab: Any, prompt: str) -> np.ndarray:
        """The text prompt's ids as the model's `prefix_tokens` row (may be empty)."""
        raise NotImplementedError

    def decode_inputs(self, images: np.ndarray, prompt_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs `encode` reads for a batch of images that share one prompt."""
        raise NotImplementedError

    def few_shot_inputs(self, images: np.ndarray, prompt_ids: np.ndarray, shot_images: np.ndarray,
                        shot_ids: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """`decode_inputs` for in-context captioning (can_few_shot): each query image [B,H,W,3]
        follows the same k solved examples, `shot_images` [k,H,W,3] with their captions' ids
        `shot_ids` (k int arrays, no EOS), each shown after the prompt as the query will be."""
        raise NotImplementedError

    def encode(self, params: Any, inputs: Mapping[str, Array]) -> Any:
        """Everything the decoder conditions on (image, prompt, ...), computed once per example:
        a pytree whose leaves have the examples on axis 0 (decoders repeat them per beam)."""
        raise NotImplementedError

    def decode_start(self, params: Any, context: Any) -> tuple[Array, Any]:
        """The first decoder step (BOS at position 0), which creates the KV cache.
        Returns (logits [B, V] of the first token, cache)."""
        raise NotImplementedError

    def decode_step(self, params: Any, cache: Any, tokens: Array, context: Any, t: Array
                    ) -> tuple[Array, Any]:
        """One cached step: tokens [N] at position t -> (logits [N, V], new cache)."""
        raise NotImplementedError

    def apply_cached(self, params: Any, cache: Any, *args, method, **kwargs) -> tuple[Array, Any]:
        """`module.apply` of one decoder step with the 'cache' collection (None: the call that
        creates it): (last position's logits [N, V], updated cache). For decode_start/step."""
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        logits, mutated = self.module.apply(variables, *args, method=method, mutable=["cache"], **kwargs)
        return logits[:, -1], mutated["cache"]

    def caption_logits(self, params: Any, context: Any, tokens: Array) -> Array:
        """Teacher forcing without a cache: logits [B, T, V] whose position t predicts
        tokens[:, t] (what the cached decoder must reproduce). `tokens` may have m rows per
        context row (rows i*m .. i*m+m-1 for example i): captions scored against one image."""
        raise NotImplementedError

    def target_layout(self) -> tuple[int, bool]:
        """(max target tokens incl. EOS, whether rows must be padded to that length) for
        texts scored or embedded zero-shot, as in training."""
        raise NotImplementedError

    # ------------------------------------------------------------------ embeddings

    def embed_images(self, params: Any, images: Array) -> Array:
        """L2-normalized image embeddings [B, E] (can_embed)."""
        raise NotImplementedError

    def embed_texts(self, params: Any, targets: Array) -> Array:
        """L2-normalized text embeddings [B, E] of target rows (can_embed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pair matching

    def match_context(self, params: Any, images: Array) -> Any:
        """What pair scoring needs of each image, computed once (can_match): a pytree with
        the images on axis 0 (zero-shot re-ranking takes rows of it per candidate pair)."""
        raise NotImplementedError

    def match_scores(self, params: Any, context: Any, targets: Array) -> Array:
        """log P(match) [B] of pairs (context row i, target row i) (can_match)."""
        raise NotImplementedError


def count_params(params: Any) -> int:
    """Number of parameters in a (possibly abstract, unboxed) param tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def encode_prompt(vocab: Any, prompt: str, max_prefix_len: int) -> np.ndarray:
    """A text prompt's token ids, zero-padded to `max_prefix_len` (an encoder text prefix)."""
    ids = list(vocab.encode(prompt))[:max_prefix_len] if prompt else []
    out = np.zeros((max_prefix_len,), np.int32)
    out[:len(ids)] = ids
    return out


def describe_stem(stages: int, units: Sequence[int], width: int) -> str:
    """The conv-stem cell of docs/models.md."""
    if not stages:
        return "linear"
    which = "stage 1" if stages == 1 else f"stages 1-{stages}"
    n = "+".join(map(str, units[:stages]))
    return f"ResNet {which} ({n} unit{'s' if n != '1' else ''}, root width {width})"
