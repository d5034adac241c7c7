"""CLIP's byte-level BPE (the tokenizer of open_clip's CoCa) as a seqio vocabulary.

Ids equal open_clip's `SimpleTokenizer`: 256 byte symbols, the same 256 with the
end-of-word marker, the 48,894 merges, then <start_of_text> = 49406 and
<end_of_text> = 49407 (49,408 in all); 0 pads, as in open_clip. Text is cleaned as
open_clip does (ftfy when installed, HTML unescaping, whitespace collapsed, lower case).

The merges come from the BPE file CLIP publishes (`bpe_simple_vocab_16e6.txt.gz`, shipped
inside open_clip_torch); pass its path, or install open_clip_torch and it is found there.
Select it in gin with `get_vocabulary.kind = 'clip_bpe'` (tasks, eval and export follow; the
open_clip model gin files do this), or per task with `image_text_task.vocabulary = @clip_vocabulary()`.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os

import gin
import regex
import seqio

SOT_ID, EOT_ID = 49406, 49407
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's published name, also inside export bundles
END_OF_WORD = "</w>"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file
# Words are letters runs, single digits, or runs of other non-space symbols; English
# contractions split off (CLIP's pre-tokenizer).
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")  # open_clip's names for ids 49406, 49407
_WORD_PATTERN = (r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                 r"""[^\s\p{L}\p{N}]+""")


def _byte_symbols() -> dict[int, str]:
    """Byte -> a printable unicode symbol: printable Latin-1 bytes map to themselves, the
    others to code points from 256 on, in byte order (the GPT-2/CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    # Vocabulary order: printable bytes first, then the remapped ones.
    return {b: symbols[b] for b in printable + [b for b in range(256) if b not in printable]}


def default_merges_path() -> str:
    """The BPE file inside an installed open_clip_torch package."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), MERGES_FILE) if spec else ""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"CLIP BPE merges file not found: set get_vocabulary.merges_path='.../{MERGES_FILE}' in gin "
            "(published with OpenAI CLIP) or `pip install open_clip_torch`, which ships it.")
    return path


class ClipBpeVocabulary(seqio.Vocabulary):
    """CLIP BPE ids (no extra ids). `encode` gives the caption's ids without <start>/<end>."""

    kind = "clip_bpe"  # `get_vocabulary.kind` and the tokenizer type export bundles record

    def __init__(self, merges_path: str | None = None):
        self._regex = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self.merges_path = merges_path or default_merges_path()
        if not os.path.exists(self.merges_path):
            raise FileNotFoundError(f"CLIP BPE merges file not found: {self.merges_path}; point "
                                    f"get_vocabulary.merges_path (or --merges_path) at CLIP's {MERGES_FILE}")
        opener = gzip.open if self.merges_path.endswith(".gz") else open
        with opener(self.merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:NUM_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        self._byte_to_symbol = _byte_symbols()
        self._symbol_to_byte = {s: b for b, s in self._byte_to_symbol.items()}
        symbols = list(self._byte_to_symbol.values())
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        tokens += list(SPECIAL_TOKENS)
        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        self._id_to_token = tokens
        self._merge_rank = {m: i for i, m in enumerate(merges)}
        self._bpe = functools.lru_cache(maxsize=100_000)(self._bpe_uncached)
        super().__init__(extra_ids=0)

    # ----------------------------------------------------------------- seqio interface
    @property
    def eos_id(self) -> int:
        return EOT_ID

    @property
    def unk_id(self) -> int | None:
        return None  # byte-level: every string is representable

    @property
    def bos_id(self) -> int:
        return SOT_ID

    @property
    def _base_vocab_size(self) -> int:
        return len(self._id_to_token)

    def _encode(self, s: str) -> list[int]:
        ids = []
        for word in self._regex.findall(_clean(s)):
            if word in SPECIAL_TOKENS:  # written out in the text: the special id, as open_clip does
                ids.append(self._token_to_id[word])
                continue
            symbols = "".join(self._byte_to_symbol[b] for b in word.encode("utf-8"))
            ids.extend(self._token_to_id[t] for t in self._bpe(symbols))
        return ids

    def _decode(self, ids) -> str:
        text = "".join(self._id_to_token[int(i)] for i in ids
                       if 0 <= int(i) < len(self._id_to_token) and int(i) not in (SOT_ID, EOT_ID))
        data = bytearray(self._symbol_to_byte[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def _encode_tf(self, s):
        raise NotImplementedError("ClipBpeVocabulary runs in the grain (Python) pipeline only, not in tf.data")

    def _decode_tf(self, ids):
        raise NotImplementedError("ClipBpeVocabulary runs in the grain (Python) pipeline only, not in tf.data")

    def __eq__(self, other) -> bool:
        return isinstance(other, ClipBpeVocabulary) and other.merges_path == self.merges_path

    def __hash__(self) -> int:
        return hash(("ClipBpeVocabulary", self.merges_path))

    # Pickled as its merges path (grain worker processes): the regex and BPE cache are rebuilt.
    def __getstate__(self) -> dict[str, str]:
        return {"merges_path": self.merges_path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["merges_path"])

    # ----------------------------------------------------------------- BPE
    def _bpe_uncached(self, symbols: str) -> tuple[str, ...]:
        """Merges a word's byte symbols (the last carries the end-of-word marker), always the
        pair with the lowest merge rank first, until no known pair is left."""
        parts = list(symbols[:-1]) + [symbols[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self._merge_rank.get(p, float("inf")))
            if best not in self._merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)


def _clean(text: str) -> str:
    try:
        import ftfy  # pylint: disable=g-import-not-at-top  (optional: ftfy, not in install_requires)
        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; clean UTF-8 text is unaffected
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


@gin.configurable
def clip_vocabulary(merges_path: str | None = None) -> ClipBpeVocabulary:
    """gin: `image_text_task.vocabulary = @clip_vocabulary()` for open_clip-compatible CoCa."""
    return ClipBpeVocabulary(merges_path)
