"""COCO captioning metrics, numerically equal to the COCO caption toolkit.

Reimplements what ``pycocoevalcap`` 1.2 computes (BLEU-1..4, ROUGE-L, CIDEr-D)
in pure Python, drives its bundled jars for PTB tokenization, METEOR and SPICE
when ``java`` is available, and reports every score x100::

    m = compute_caption_metrics({"1": ["a dog runs", ...]}, {"1": "a dog"})
    print(format_metrics(m))

Exactness: with java, captions are tokenized by the toolkit's own PTBTokenizer
(stanford-corenlp-3.4.1.jar, same flags, references and predictions as two
files in one JVM via -ioFileList, i.e. identical to the toolkit's two calls)
and every score equals pycocoevalcap's to floating-point rounding.

Known deviations from the toolkit (by design):
  * Line-break characters inside a caption (``\\r``, U+2028, ...) become spaces
    before tokenization (the toolkit only does this for ``\\n`` and otherwise
    misaligns captions and images).
  * Images are evaluated in ``predictions`` order; reference ids without a
    prediction are ignored (the toolkit asserts equal id sets). PTB lexing of a
    line can depend on the next line (e.g. "... A." before "The ..."), so the
    toolkit is matched exactly when its gts dict uses the same order.
  * The pure-Python PTB tokenizer (used without java) emulates PTBLexer 3.4.1;
    it agrees with the jar on all tested caption-like text, but exotic input
    (URLs glued to words, SGML, rare unicode symbols) may be split differently.
  * SPICE runs without the toolkit's LMDB cache directory.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from typing import Iterable, Optional

ALL_METRICS = ("bleu", "meteor", "rouge_l", "cider", "spice")
TOKENIZERS = ("auto", "ptb-java", "ptb-python")
# Removed after PTB tokenization, exactly as pycocoevalcap's PTBTokenizer does.
# (The bracket codes never match: they are lowercased by -lowerCase first.)
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
JAVA_TIMEOUT_S = 600.0
SPICE_TIMEOUT_S = 1800.0
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\u000b\u000c\u0085]")


# --------------------------------------------------------------------------
# Locating the toolkit's jars
# --------------------------------------------------------------------------

def _cocoeval_dir() -> Optional[str]:
    """Directory of the installed pycocoevalcap package, without importing it."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _jar(*parts: str) -> Optional[str]:
    root = _cocoeval_dir()
    path = os.path.join(root, *parts) if root else None
    return path if path and os.path.isfile(path) else None


def _java() -> Optional[str]:
    return shutil.which("java")


# --------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------

def _clean_ptb_line(line: str) -> str:
    """pycocoevalcap's post-processing of one tokenizer output line."""
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def _ptb_java(blocks: list[list[str]], java: str, jar: str) -> list[list[str]]:
    """Tokenize each block (one file per block, as pycocoevalcap does for gts and
    res) with Stanford's PTBTokenizer in a single JVM via -ioFileList."""
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        pairs = []
        for i, block in enumerate(blocks):
            src, dst = os.path.join(tmp, f"in{i}.txt"), os.path.join(tmp, f"out{i}.txt")
            with open(src, "wb") as f:
                f.write("\n".join(block).encode("utf-8"))
            pairs.append(f"{src}\t{dst}")
        listing = os.path.join(tmp, "files.txt")
        with open(listing, "w", encoding="utf-8") as f:
            f.write("\n".join(pairs) + "\n")
        cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "utf-8", "-ioFileList", listing]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=JAVA_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"PTBTokenizer failed: {proc.stderr.decode(errors='replace')[-500:]}")
        out = []
        for i, block in enumerate(blocks):
            with open(os.path.join(tmp, f"out{i}.txt"), encoding="utf-8") as f:
                lines = f.read().split("\n")
            if len(lines) < len(block):
                raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(block)} captions")
            out.append([_clean_ptb_line(l) for l in lines[:len(block)]])
    return out


def ptb_tokenize_python(captions: list[str]) -> list[str]:
    """Pure-Python emulation of pycocoevalcap's PTBTokenizer on one file of captions."""
    text = "\n".join(_LINE_BREAKS.sub(" ", c) for c in captions)
    lines = _ptb_lex_lines(text)
    lines += [[] for _ in range(len(captions) - len(lines))]
    return [_clean_ptb_line(" ".join(toks).lower()) for toks in lines[:len(captions)]]


def _tokenize(refs: list[list[str]], preds: list[str], mode: str,
              notes: list[str]) -> tuple[list[list[str]], list[str], str]:
    """Tokenize references and predictions; returns (refs, preds, tokenizer name)."""
    flat_refs = [_LINE_BREAKS.sub(" ", r) for rs in refs for r in rs]
    flat_preds = [_LINE_BREAKS.sub(" ", p) for p in preds]
    java, jar = _java(), _jar("tokenizer", "stanford-corenlp-3.4.1.jar")
    tok_refs = tok_preds = None
    name = "ptb-python"
    if mode in ("auto", "ptb-java"):
        reason = None
        if java is None:
            reason = "java not found"
        elif jar is None:
            reason = "pycocoevalcap (stanford-corenlp-3.4.1.jar) not found"
        else:
            try:
                tok_refs, tok_preds = _ptb_java([flat_refs, flat_preds], java, jar)
                name = "ptb-java"
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
                reason = f"java PTBTokenizer failed ({e})"
        if reason is not None:
            if mode == "ptb-java":
                raise RuntimeError(f"tokenizer='ptb-java' unavailable: {reason}")
            notes.append(f"Tokenizer: used the pure-Python PTB emulation ({reason}).")
    else:
        notes.append("Tokenizer: used the pure-Python PTB emulation (requested).")
    if tok_refs is None:
        tok_refs, tok_preds = ptb_tokenize_python(flat_refs), ptb_tokenize_python(flat_preds)
    it = iter(tok_refs)
    return [[next(it) for _ in rs] for rs in refs], tok_preds, name


def _ptb_lex_lines(text: str) -> list[list[str]]:
    """Longest-match lexer emulating Stanford PTBLexer 3.4.1 (default options,
    -preserveLines): at each position every rule is tried, the longest match
    (counting trailing context) wins and ties go to the earlier rule, as in JFlex."""
    rules = _ptb_rules()
    lines: list[list[str]] = [[]]
    pos, n = 0, len(text)
    while pos < n:
        m = _FAST_WORD.match(text, pos)  # plain word before a space: always a WORD token
        if m and m.group(1).lower() not in _ASSIMILATIONS:
            lines[-1].append(m.group(1))
            pos = m.end(1)
            continue
        best, best_len = None, 0
        for pattern, action in rules:
            m = pattern.match(text, pos)
            if m and m.end() - pos > best_len:
                best, best_len = (action, m), m.end() - pos
        if best is None:  # untokenizable character: deleted
            pos += 1
            continue
        token, advance = best[0](best[1].group("t"))
        if token == "\n":
            lines.append([])
        elif token:
            lines[-1].append(token)
        pos += max(advance, 1)
    return lines


_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_FAST_WORD = re.compile(r"([A-Za-z]+)(?=[ \t\n]|\Z)")


def _letter_class() -> str:
    """Regex class of Unicode letters in the BMP (Java's Character.isLetter)."""
    ranges, start = [], None
    for cp in range(0x10000):
        alpha = chr(cp).isalpha() and not 0xD800 <= cp <= 0xDFFF
        if alpha and start is None:
            start = cp
        elif not alpha and start is not None:
            ranges.append((start, cp - 1))
            start = None
    body = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in ranges)
    return f"[{body}\u00ad\u0300-\u036f]"


def _latex_quotes(tok: str, left: bool) -> str:
    tok = re.sub(r"&apos;|'", "`" if left else "'", tok)
    tok = re.sub(r'"|&quot;', "``" if left else "''", tok)
    tok = re.sub("[\u0091\u2018\u201b\u2039]", "`", tok)
    tok = re.sub("[\u0092\u2019\u203a]", "'", tok)
    tok = re.sub("[\u0093\u201c\u00ab]", "``", tok)
    return re.sub("[\u0094\u201d\u00bb]", "''", tok)


@functools.lru_cache(maxsize=1)
def _ptb_rules() -> list:
    """Compile the rule table: list of (pattern with group 't', action)."""
    L = _letter_class()
    LD = f"(?:{L}|\\d)"
    SP = "[ \t\u00a0\u2000-\u200a\u3000]"
    NL = "\n"
    SPNL = f"(?:{SP}|{NL})"
    APOS = "(?:['\u0092\u2019]|&apos;)"
    APOSX = f"(?:{APOS}|[`\u0091\u2018\u201b])"
    NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
    SGML = (f"<(?:[!?][A-Za-z-][^>\n]*|/?{NAME}(?:[ ]+{NAME}(?:[ ]*=[ ]*(?:'[^'\n]*'|\"[^\"\n]*\"|{NAME}))?)*"
            "[ ]*/?)[ ]*>")
    WORD = f"{L}{LD}*(?:[.!?]{L}{LD}*)*"
    REDAUX = f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
    SREDAUX = f"[nN]{APOSX}[tT]"
    NUM1, NUM2 = r"\d+", r"\d*(?:[.:,\u00ad\u066b\u066c]\d+)+"
    ACRO = r"[A-Za-z](?:\.[A-Za-z])+"
    ABBREV1 = ("(?i:(?:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri"
               "|ala|ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|la|md|mich|minn|mo|mont|neb|nev"
               "|okla|penn?|tenn|tex|va|vt|wisc?|wyo|inc|cos?|corp|pp?tys?|ltd|plc|bancorp|dept|bhd"
               "|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros|(?:ed|ph)\\.d|blvd|rd|esq|etc|al|seq)"
               "|Ark|Del|Ill|Mass|Miss|Ore|Wash)\\.")
    ABBREV4 = (f"(?:{ACRO}|[A-Za-z]|Miss|(?i:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen"
               "|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr"
               "|pfc|spc|supts?|det|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|invt|elec|natl|m[ft]g))")
    ACRO_NEXT = "|".join(w[0] + f"(?i:{re.escape(w[1:])})" if len(w) > 1 else w for w in (
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last "
        "Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There "
        "These They This We When While What Yet You").split())
    HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO}\\.|[A-Za-z0-9\u00ad]+))+"
    THING = (f"(?:[dDoOlL]{APOSX}{LD})?{LD}+"
             f"(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{APOSX}{LD})?{LD}+)*")
    THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
    THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    QUOTES = ("(?:''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}|"
              + APOS + ")")
    MISC = ("[\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u2020-\u2023"
            "\u2030-\u2038\u2100-\u214f\u2190-\u21ff\u2200-\u22ff\u2600-\u26ff]")
    SMILEY = r"[<>]?[:;=][\-o\*']?[()DPdpO\\{@|\[\]]"

    def keep(t):
        return t, len(t)

    def const(value):
        return lambda t: (value, len(t))

    def pushback(k):  # JFlex yypushback(k): emit all but the last k characters
        return lambda t: (t[:-k], len(t) - k)

    def dup_period(t):  # token keeps its period; the period is re-lexed
        return t, len(t) - 1

    def acronym(t):  # "I." -> "I" + "."; "U.S." -> "U.S." + "."
        return (t[:-1], len(t) - 1) if len(t) == 2 else (t, len(t) - 1)

    def quote(left):
        return lambda t: (_latex_quotes(t, left), len(t))

    def paren_norm(t):
        return t.replace("(", "-LRB-").replace(")", "-RRB-").replace(" ", "\u00a0"), len(t)

    def dashes(t):
        return ("--" if 3 <= len(t) <= 4 else t), len(t)

    def currency(t):
        return {"\u00a2": "cents", "\u00a3": "#"}.get(t, "$" if t in "\u0080\u00a4\u20a0\u20ac" else t), len(t)

    def fraction(t):
        return {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3"}.get(t, t), len(t)

    def nbsp(t):
        return t.replace(" ", "\u00a0"), len(t)

    def newline(t):
        return "\n", len(t)

    def skip(t):
        return "", len(t)

    table = [  # (token regex, trailing-context regex or None, action)
        (f"(?i:cannot|{APOS}twas)", None, pushback(3)),
        (f"(?i:{APOS}tis|gonna|gotta|lemme|gimme|wanna)", None, pushback(2)),
        (SGML, None, nbsp),
        ("(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]", None, const("--")),
        ("(?i:&amp;)", None, const("&")),
        ("(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)", None, keep),
        (WORD, REDAUX, keep),
        ("[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", SREDAUX, keep),
        (WORD, None, keep),
        (f"{APOS}[nN]{APOS}?", None, keep),
        (f"[lLdDjJ]{APOS}", None, keep),
        (f"(?i:dunkin|somethin|ol){APOS}", None, keep),
        (f"{APOS}(?i:em|till?|cause)", None, keep),
        (f"[A-HJ-XZn]{APOSX}{L}{{2}}{L}*", None, keep),
        (f"{APOS}[2-9]0[sS]", None, keep),
        (f"{L}+?[aeiouyAEIOUY]{APOSX}[aeiouA-Z]{L}*", None, keep),
        ("(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", None, keep),
        (f"[yY]{APOS}", L, keep),
        (r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]*[^ \t\n\f\r\"<>|.!?(){},-]", None, keep),
        (r"(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
         r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"  # sic: ",-_" is a range
         r"(?:/[^ \t\n\f\r\"<>|()]*[^ \t\n\f\r\"<>|.!?(){},-])?", None, keep),
        (r"(?:<|&lt;)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00a0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\.)*"
         r"[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:>|&gt;)?", None, keep),
        (r"@[a-zA-Z_][a-zA-Z_0-9]*", None, keep),
        (f"#{L}+", None, keep),
        (REDAUX, "[^A-Za-z]", quote(False)),
        (SREDAUX, None, quote(False)),
        (r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}", None, keep),
        (f"[-+]?{NUM1}", None, keep),
        (f"[-+]?{NUM2}", None, keep),
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None, keep),
        (r"(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", None, nbsp),
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", None, fraction),
        (r"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)", None,
         lambda t: (re.sub("(?i:&amp;)", "&", t), len(t))),
        (f"(?i:cap{APOS}n|c{APOS}est)", None, keep),
        (r"(?i:c\+\+|[cf]#)", None, keep),
        (THING3, None, keep),
        (r"[A-Z]*\$|#", None, keep),
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", None, currency),
        (r"[A-Za-z](?:\.[A-Za-z])*\.", f"{SPNL}+(?:{ACRO_NEXT}){SPNL}", acronym),
        (r"(?i:ca|figs?|nos?|prop|pp|op)\.", f"{SPNL}?\\d", keep),
        (ABBREV1, f"{SPNL}(?:{SPNL}|[A-Z]|{SGML})", dup_period),
        (ABBREV1, "(?s:..)", keep),
        (ABBREV1, None, dup_period),
        (f"{ABBREV4}\\.", None, keep),
        (ABBREV4, SP, keep),
        (ACRO, SPNL, keep),
        (f"{APOS}[0-9][0-9]", SPNL, keep),
        (r"[A-Za-z0-9]+\.(?i:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java"
         r"|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)", f"{SPNL}|[.?!,\"'<]", keep),
        (f"{WORD}\\.", "[,;:]", keep),
        (r"(?:\([0-9]{3}\)[ \u00a0]?|[0-9]{3}[\- \u00a0.])[0-9]{3}[\- \u00a0.][0-9]{4}", None, paren_norm),
        (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00a0])?[0-9]{2,4}[\- \u00a0])"
         r"[0-9]{3,4}[\- \u00a0]?[0-9]{3,5}", None, paren_norm),
        ('"|&quot;', "[A-Za-z0-9$]", quote(True)),
        ('"|&quot;', None, quote(False)),
        (r"[+%&~^|\\\u2030\u2031]", None, keep),
        ("<<|>>", None, keep),
        ("<|&lt;", None, const("<")),
        (">|&gt;", None, const(">")),
        (SMILEY, r"[^A-Za-z0-9]|\Z", paren_norm),
        (r"[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)", None, paren_norm),
        (r"\{", None, const("-LCB-")), (r"\}", None, const("-RCB-")),
        (r"\[", None, const("-LSB-")), (r"\]", None, const("-RSB-")),
        (r"\(", None, const("-LRB-")), (r"\)", None, const("-RRB-")),
        (r"-+", None, dashes),
        ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", None, const("...")),
        (r"@+|#+|_+", None, keep),
        (r"\*+|(?:\\\*){1,3}", None, keep),
        (r"[,;:]", None, keep),
        (r"[?!]+", None, keep),
        ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa]", None, keep),
        ("=", None, keep),
        ("/", None, keep),
        (HTHING + r"\.", "[,;:]", keep),
        (HTHING, None, keep),
        (THING + r"\.", "[,;:]", keep),
        (THING, None, keep),
        (THINGA + r"\.", "[,;:]", lambda t: (t.replace("&amp;", "&"), len(t))),
        (THINGA, None, lambda t: (t.replace("&amp;", "&"), len(t))),
        ("'", "[A-Za-z][^ \t\n\r\u00a0]", quote(True)),
        (REDAUX, None, quote(False)),
        (QUOTES, None, quote(False)),
        (MISC, None, keep),
        (f"{SP}+|[\u200b\u200e\u200f\ufeff\x00]", None, skip),
        (NL, None, newline),
    ]
    rules = []
    for tok, ctx, action in table:
        pattern = f"(?P<t>{tok})" + (f"(?:{ctx})" if ctx else "")
        rules.append((re.compile(pattern), action))
    return rules


# --------------------------------------------------------------------------
# BLEU (pycocoevalcap Bleu(4), option "closest")
# --------------------------------------------------------------------------

def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu_scores(refs: list[list[str]], hyps: list[str], n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-image BLEU-1..n, exactly as BleuScorer.compute_score."""
    small, tiny = 1e-9, 1e-15
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image: list[list[float]] = []
    for rs, hyp in zip(refs, hyps):
        max_counts: dict = {}
        ref_lens = []
        for r in rs:
            words = r.split()
            ref_lens.append(len(words))
            for g, c in _ngrams(words, n).items():
                max_counts[g] = max(max_counts.get(g, 0), c)
        words = hyp.split()
        test_len = len(words)
        ref_len = min((abs(l - test_len), l) for l in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for g, c in _ngrams(words, n).items():
            correct[len(g) - 1] += min(max_counts.get(g, 0), c)
        total_test += test_len
        total_ref += ref_len
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
        per_image.append(_bleu_from_counts(correct, guess, test_len, ref_len, n))
    corpus = []
    bleu = 1.0
    for k in range(n):
        bleu *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(bleu ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
    return corpus, per_image


def _bleu_from_counts(correct: list[int], guess: list[int], test_len: int, ref_len: int, n: int) -> list[float]:
    """One image's BLEU-1..n with the toolkit's smoothing and brevity penalty."""
    small, tiny = 1e-9, 1e-15
    out, bleu = [], 1.0
    for k in range(n):
        bleu *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        out.append(bleu ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


# --------------------------------------------------------------------------
# ROUGE-L (beta 1.2)
# --------------------------------------------------------------------------

def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_scores(refs: list[list[str]], hyps: list[str], beta: float = 1.2) -> list[float]:
    """Per-image ROUGE-L exactly as pycocoevalcap's Rouge.calc_score."""
    scores = []
    for rs, hyp in zip(refs, hyps):
        cand = hyp.split(" ")
        prec, rec = [], []
        for r in rs:
            toks = r.split(" ")
            lcs = _lcs(toks, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(toks)))
        p, r = max(prec), max(rec)
        scores.append(((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    return scores


# --------------------------------------------------------------------------
# CIDEr-D (sigma 6, n 4, clipped, x10)
# --------------------------------------------------------------------------

class CiderD:
    """CIDEr-D exactly as pycocoevalcap's CiderScorer, with the references' n-gram vectors
    (and document frequencies) computed once, so many hypothesis sets can be scored."""

    def __init__(self, refs: list[list[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        crefs = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
        self.df: Counter = Counter()
        for rs in crefs:
            self.df.update(set(g for r in rs for g in r))
        self.ref_len = math.log(float(len(crefs)))
        self.ref_vecs = [[self._vec(r) for r in rs] for rs in crefs]

    def _vec(self, counts: Counter):
        v = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (self.ref_len - math.log(max(1.0, float(self.df.get(g, 0.0)))))
            norm[k] += v[k][g] ** 2
            if k == 1:  # (sic) the toolkit's "length" counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def scores(self, hyps: list[str]) -> list[float]:
        """Per-image CIDEr-D of `hyps` (one per reference set, same order)."""
        n, sigma = self.n, self.sigma
        out = []
        hyp_vecs: dict[str, tuple] = {}  # repeated hypotheses (e.g. a constant caption) vectorized once
        for ref_vecs, hyp in zip(self.ref_vecs, hyps):
            if hyp not in hyp_vecs:
                hyp_vecs[hyp] = self._vec(_ngrams(hyp.split(), n))
            vh, nh, lh = hyp_vecs[hyp]
            acc = [0.0] * n
            for vr, nr, lr in ref_vecs:
                delta = float(lh - lr)
                for k in range(n):
                    val = 0.0
                    for g, x in vh[k].items():
                        y = vr[k].get(g, 0.0)
                        val += min(x, y) * y
                    if nh[k] != 0 and nr[k] != 0:
                        val /= nh[k] * nr[k]
                    acc[k] += val * math.e ** (-(delta ** 2) / (2 * sigma ** 2))
            out.append(sum(acc) / n / len(ref_vecs) * 10.0)
        return out


def cider_d_scores(refs: list[list[str]], hyps: list[str], n: int = 4, sigma: float = 6.0) -> list[float]:
    """Per-image CIDEr-D exactly as pycocoevalcap's CiderScorer."""
    return CiderD(refs, n, sigma).scores(hyps)


# --------------------------------------------------------------------------
# METEOR (bundled meteor-1.5.jar, same protocol as pycocoevalcap's Meteor)
# --------------------------------------------------------------------------

def meteor_scores(refs: list[list[str]], hyps: list[str], java: str, jar: str,
                  timeout: float = JAVA_TIMEOUT_S) -> tuple[float, list[float]]:
    """Corpus and per-image METEOR from one `-stdio` METEOR process."""
    cmd = [java, "-jar", "-Xmx2G", os.path.basename(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(jar), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:  # reader thread, so that every read can time out
        for line in iter(proc.stdout.readline, b""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout

    def read() -> str:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"METEOR timed out after {timeout:.0f}s")
        line = lines.get(timeout=left)
        if line is None:
            raise RuntimeError("METEOR process exited unexpectedly")
        return line.decode().strip()

    def send(text: str) -> None:
        proc.stdin.write((text + "\n").encode())
        proc.stdin.flush()

    try:
        stats = []
        for rs, hyp in zip(refs, hyps):
            hyp = hyp.replace("|||", "").replace("  ", " ")
            send(" ||| ".join(("SCORE", " ||| ".join(rs), hyp)))
            stats.append(read())
        send("EVAL ||| " + " ||| ".join(stats))
        per_image = [float(read()) for _ in hyps]
        return float(read()), per_image
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------
# SPICE (bundled spice-1.0.jar; needs Stanford CoreNLP 3.6.0 model jars)
# --------------------------------------------------------------------------

SPICE_MODEL_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_unavailable_reason() -> Optional[str]:
    """Why SPICE cannot run here, or None if it can."""
    jar = _jar("spice", "spice-1.0.jar")
    if jar is None:
        return "pycocoevalcap's spice-1.0.jar not found"
    if _java() is None:
        return "java not found"
    lib = os.path.join(os.path.dirname(jar), "lib")
    missing = [j for j in SPICE_MODEL_JARS if not os.path.isfile(os.path.join(lib, j))]
    if missing:
        return (f"Stanford CoreNLP models not present in {lib} (missing {', '.join(missing)}); "
                "run pycocoevalcap/spice/get_stanford_models.py with network access")
    return None


def spice_scores(refs: list[list[str]], hyps: list[str],
                 timeout: float = SPICE_TIMEOUT_S) -> tuple[float, list[float]]:
    """Corpus (mean) and per-image SPICE F-scores via spice-1.0.jar."""
    jar = _jar("spice", "spice-1.0.jar")
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w", encoding="utf-8") as f:
            json.dump([{"image_id": i, "test": h, "refs": rs} for i, (rs, h) in enumerate(zip(refs, hyps))], f)
        cmd = [_java(), "-jar", "-Xmx8G", os.path.basename(jar), src, "-out", dst, "-subset", "-silent"]
        subprocess.run(cmd, cwd=os.path.dirname(jar), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, check=True)
        with open(dst, encoding="utf-8") as f:
            results = {int(r["image_id"]): r["scores"]["All"]["f"] for r in json.load(f)}

    def as_float(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    per_image = [as_float(results.get(i)) for i in range(len(hyps))]
    return sum(per_image) / len(per_image), per_image


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

def _validate(references: dict, predictions: dict, tokenizer: str, metrics: Iterable[str]) -> list:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    if not predictions:
        raise ValueError("predictions is empty")
    for i, pred in predictions.items():
        if i not in references:
            raise ValueError(f"prediction id {i!r} has no references")
        if not isinstance(pred, str):
            raise ValueError(f"prediction for id {i!r} must be a string, got {type(pred).__name__}")
        refs = references[i]
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f"references for id {i!r} must be a list of strings")
        if len(refs) == 0:
            raise ValueError(f"empty reference list for id {i!r}")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for id {i!r} must all be strings")
    return list(predictions)


def compute_caption_metrics(references: dict[str, list[str]], predictions: dict[str, str], *,
                            tokenizer: str = "auto",
                            metrics: tuple[str, ...] = ALL_METRICS) -> dict:
    """COCO caption metrics (x100) of `predictions` against `references`.

    Returns bleu1..4, meteor, rouge_l, cider, spice (None when skipped), a
    per_image dict of scores, the tokenizer used and explanatory notes.
    """
    ids = _validate(references, predictions, tokenizer, metrics)
    notes: list[str] = []
    extra = len(set(references) - set(predictions))
    if extra:
        notes.append(f"{extra} reference id(s) without a prediction were ignored.")
    refs, hyps, tok_name = _tokenize([list(references[i]) for i in ids], [predictions[i] for i in ids],
                                     tokenizer, notes)
    result: dict = {k: None for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")}
    per_image: dict = {i: {} for i in ids}

    def put(name: str, corpus: float, scores: list[float]) -> None:
        result[name] = 100.0 * corpus
        for i, s in zip(ids, scores):
            per_image[i][name] = 100.0 * s

    if "bleu" in metrics:
        corpus, per = bleu_scores(refs, hyps)
        for k in range(4):
            put(f"bleu{k + 1}", corpus[k], [p[k] for p in per])
    if "meteor" in metrics:
        java, jar = _java(), _jar("meteor", "meteor-1.5.jar")
        if java is None or jar is None:
            notes.append("METEOR skipped: " + ("java not found" if java is None else "meteor-1.5.jar not found"))
        else:
            try:
                put("meteor", *meteor_scores(refs, hyps, java, jar))
            except (OSError, RuntimeError, ValueError, TimeoutError, queue.Empty) as e:
                notes.append(f"METEOR skipped: {type(e).__name__}: {e}")
    if "rouge_l" in metrics:
        scores = rouge_l_scores(refs, hyps)
        put("rouge_l", sum(scores) / len(scores), scores)
    if "cider" in metrics:
        scores = cider_d_scores(refs, hyps)
        put("cider", sum(scores) / len(scores), scores)
    if "spice" in metrics:
        reason = spice_unavailable_reason()
        if reason is None:
            try:
                put("spice", *spice_scores(refs, hyps))
            except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            notes.append(f"SPICE skipped: {reason}")
    result.update(per_image=per_image, tokenizer=tok_name, notes=notes)
    return result


def format_metrics(m: dict) -> str:
    """One-line summary, e.g. 'BLEU-4 36.1 | METEOR 28.0 | ... | tok=ptb-java'."""
    names = [("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"),
             ("cider", "CIDEr"), ("spice", "SPICE")]
    parts = [f"{label} {m[key]:.2f}" for key, label in names if m.get(key) is not None]
    skipped = [label for key, label in names if key in m and m[key] is None]
    line = " | ".join(parts + [f"n={len(m.get('per_image', {}))}", f"tok={m.get('tokenizer')}"])
    return line + (f" | skipped: {', '.join(skipped)}" if skipped else "")
