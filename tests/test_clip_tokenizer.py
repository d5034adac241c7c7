"""CLIP BPE as a seqio vocabulary: ids equal open_clip's tokenizer (the CoCa ViT-B-32/L-14 one)."""
from __future__ import annotations

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")

from simvlm_jax.data import clip_tokenizer  # noqa: E402  pylint: disable=g-import-not-at-top

TEXTS = [
    "a photo of a cat.", "A DOG running on the beach!!", "two   people,\tone umbrella\n",
    "it's what they've done; we'd say they'll win", "naïve café — déjà vu", "emoji 🐶🐱 and 日本語のテキスト",
    "numbers 12345 and 3.14", "&amp; html &lt;b&gt; entities", "", "x" * 60, "supercalifragilisticexpialidocious",
    "a <start_of_text> b <end_of_text>!",
]


@pytest.fixture(scope="module")
def vocab():
    return clip_tokenizer.ClipBpeVocabulary()


def test_ids_equal_open_clip(vocab):
    ref = open_clip.tokenizer.SimpleTokenizer()
    for text in TEXTS:
        assert vocab.encode(text) == ref.encode(text), text
    # open_clip.tokenize = [<start>] + ids + [<end>], 0-padded: exactly what CoCa reads.
    toks = open_clip.tokenize(TEXTS[:3], context_length=16).numpy()
    for row, text in zip(toks, TEXTS[:3]):
        ids = [clip_tokenizer.SOT_ID] + vocab.encode(text) + [vocab.eos_id]
        np.testing.assert_array_equal(row[:len(ids)], ids)


def test_decode_round_trip_and_sizes(vocab):
    assert vocab.vocab_size == 49408 and vocab.eos_id == 49407 and vocab.pad_id == 0
    for text in ("a photo of a cat .", "déjà vu 🐶"):
        assert vocab.decode(vocab.encode(text)) == text
    assert vocab.decode([clip_tokenizer.SOT_ID] + vocab.encode("hello world") + [vocab.eos_id]) == "hello world"


def test_missing_merges_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^CLIP BPE merges file not found: .*nope.txt.gz; point "
                                                r"get_vocabulary.merges_path"):
        clip_tokenizer.ClipBpeVocabulary(str(tmp_path / "nope.txt.gz"))


def test_pickles_as_its_merges_path(vocab):
    """grain worker processes receive the vocabulary pickled: it comes back equal and working."""
    import pickle  # pylint: disable=g-import-not-at-top
    vocab.encode("warm the bpe cache")
    data = pickle.dumps(vocab)
    assert len(data) < 1000  # the path, not the tables
    again = pickle.loads(data)
    assert again == vocab and again.encode(TEXTS[4]) == vocab.encode(TEXTS[4])
