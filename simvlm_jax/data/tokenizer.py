"""SentencePiece tokenizer: trained on a corpus by the prepare step, used as a seqio vocabulary.

Ids follow the seqio/T5 convention: pad=0 (also the decoder's BOS), eos=1, unk=2,
no BOS piece. Point gin at your own model with `get_vocabulary.path = '...'`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterable, Iterator, Sequence

import gin
import seqio
import sentencepiece as spm

from simvlm_jax.data import sources
from simvlm_jax.data import clip_tokenizer
from simvlm_jax.special_tokens import EOS_ID, PAD_ID, UNK_ID


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 512,
                        model_type: str = "bpe", character_coverage: float = 1.0) -> str:
    """Trains a SentencePiece model on `texts` and writes it to `model_path` (.model).
    `character_coverage` < 1 maps the rarest characters to unk (large alphabets, e.g. CJK)."""
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False, num_threads=2,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)
    return model_path


VOCABULARY_KINDS = ("sentencepiece", "clip_bpe")


@gin.configurable
def get_vocabulary(path: str | None = None, kind: str = "sentencepiece",
                   merges_path: str | None = None) -> seqio.Vocabulary:
    """The tokenizer as a seqio vocabulary, chosen in gin by `get_vocabulary.kind`:

    'sentencepiece': the SentencePiece model file `path` (trained by the prepare step).
    'clip_bpe': CLIP's byte-level BPE, open_clip's CoCa tokenizer (`clip_tokenizer.ClipBpeVocabulary`)
      from `merges_path` (default: the file open_clip_torch ships). `path` is not read, so a
      data gin file that binds it for SentencePiece still combines with an open_clip model gin.
    """
    if kind == "clip_bpe":
        return clip_tokenizer.ClipBpeVocabulary(merges_path)
    if kind != "sentencepiece":
        raise ValueError(f"get_vocabulary.kind={kind!r}; choose one of {list(VOCABULARY_KINDS)}")
    if path is None:
        raise ValueError("get_vocabulary.path is not set: bind it to a SentencePiece .model file in gin "
                         "(or set get_vocabulary.kind = 'clip_bpe' for open_clip's tokenizer)")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model not found: {path}. Run the prepare step "
            f"(`python -m simvlm_jax.main --mode=prepare ...`) or set get_vocabulary.path in gin.")
    return seqio.SentencePieceVocabulary(path)


def iter_texts(patterns: Iterable[str], jsonl_field: str = "text", parquet_column: str = "caption",
               max_texts: int | None = None) -> Iterator[str]:
    """The texts of captioning data and text corpora, by file type: webdataset `.tar` (each
    sample's .txt, or .json 'caption'), `.txt` (one document per line), `.jsonl` (`jsonl_field`),
    `.parquet` (`parquet_column`), COCO / Karpathy `.json` annotations (every caption)."""
    count = 0
    for pattern in patterns:
        for path in sources.expand_paths(pattern):
            for text in _texts_of(path, jsonl_field, parquet_column):
                text = " ".join(text.split())
                if text:
                    yield text
                    count += 1
                    if max_texts and count >= max_texts:
                        return


def _texts_of(path: str, jsonl_field: str, parquet_column: str) -> Iterator[str]:
    name = path.lower()
    if name.endswith(".tar"):
        src = sources.TarShardSource(path)
        for i in range(len(src)):
            record = src[i]
            text = record.get("txt")
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            yield text or str(sources.read_json(record).get("caption") or "")
    elif name.endswith(".jsonl"):
        src = sources.JsonlTextSource(path, field=jsonl_field)
        for i in range(len(src)):
            text = src[i].get("text")
            yield text.decode("utf-8", "replace") if isinstance(text, bytes) else (text or "")
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only for parquet inputs)
        with sources.open_file(path) as f:
            yield from (str(t or "") for t in pq.read_table(f, columns=[parquet_column]).column(0).to_pylist())
    elif name.endswith(".json"):
        data = json.loads(sources.read_file(path))
        if "images" in data and data["images"] and "sentences" in data["images"][0]:  # Karpathy
            yield from (s["raw"] for image in data["images"] for s in image["sentences"])
        else:  # COCO captions_*.json
            yield from (a["caption"] for a in data.get("annotations", []))
    else:
        with sources.open_file(path) as f:
            for line in f:
                yield line.decode("utf-8", "replace") if isinstance(line, bytes) else line


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m simvlm_jax.data.tokenizer --input GLOB [--input GLOB ...] --vocab_size N --output F`."""
    parser = argparse.ArgumentParser(
        prog="python -m simvlm_jax.data.tokenizer",
        description="Trains a SentencePiece model with the ids simvlm_jax needs (pad=0, eos=1, unk=2, "
                    "no BOS) on your captions and text corpus.")
    parser.add_argument("--input", action="append", required=True,
                        help="glob of .tar shards, .txt, .jsonl, .parquet or COCO/Karpathy .json; repeatable")
    parser.add_argument("--vocab_size", type=int, required=True, help="pieces wanted (an upper bound)")
    parser.add_argument("--output", required=True, help="the .model file to write")
    parser.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--character_coverage", type=float, default=1.0,
                        help="fraction of characters kept as pieces (1.0; e.g. 0.9995 for CJK)")
    parser.add_argument("--jsonl_field", default="text")
    parser.add_argument("--parquet_column", default="caption")
    parser.add_argument("--max_texts", type=int, default=None, help="stop reading after this many texts")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        print(f"error: {args.output} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        texts = list(iter_texts(args.input, args.jsonl_field, args.parquet_column, args.max_texts))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: reading --input: {e}", file=sys.stderr)
        return 2
    if not texts:
        print(f"error: no text found in {args.input}", file=sys.stderr)
        return 2
    try:
        train_sentencepiece(texts, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                            character_coverage=args.character_coverage)
    except RuntimeError as e:  # e.g. fewer pieces asked than the corpus has characters
        reason = str(e).split("]", 1)[-1].strip()
        print(f"error: SentencePiece: {reason} (--vocab_size {args.vocab_size})", file=sys.stderr)
        return 2
    vocab = seqio.SentencePieceVocabulary(args.output)
    size = vocab.vocab_size
    print(f"{args.output}: {size} pieces from {len(texts):,} texts (pad=0 eos=1 unk=2). In your gin:\n"
          f"  get_vocabulary.path = '{os.path.abspath(args.output)}'\n"
          f"  SimVLMConfig.vocab_size = {size}   # or CoCaConfig.vocab_size; up to "
          f"{-(-size // 128) * 128} is fine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
