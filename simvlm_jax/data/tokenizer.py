"""SentencePiece tokenizer: trained on a corpus by the prepare step, used as a seqio vocabulary.

Ids follow the seqio/T5 convention: pad=0 (also the decoder's BOS), eos=1, unk=2,
no BOS piece. Point gin at your own model with `get_vocabulary.path = '...'`.
"""
from __future__ import annotations

import io
import os
from typing import Iterable

import gin
import seqio
import sentencepiece as spm

from simvlm_jax.special_tokens import EOS_ID, PAD_ID, UNK_ID


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int = 512,
                        model_type: str = "bpe") -> str:
    """Trains a SentencePiece model on `texts` and writes it to `model_path` (.model)."""
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False, num_threads=2,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    tmp = model_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)
    return model_path


@gin.configurable
def get_vocabulary(path: str = gin.REQUIRED) -> seqio.SentencePieceVocabulary:
    """The seqio vocabulary of a SentencePiece model file."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model not found: {path}. Run the prepare step "
            f"(`python -m simvlm_jax.main --mode=prepare ...`) or set get_vocabulary.path in gin.")
    return seqio.SentencePieceVocabulary(path)
