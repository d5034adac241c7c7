"""Parity of simvlm_jax.caption_metrics with the COCO caption toolkit (pycocoevalcap 1.2)."""

import math
import random
import shutil
import subprocess

import pytest

from simvlm_jax import caption_metrics as cm

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH")

COCO_LIKE = (
    {
        "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.",
              "a person surfing in the ocean", "Man on a surfboard riding a wave!", "A surfer in the water."],
        "2": ["Two dogs playing with a frisbee in the park.", "Two brown dogs play with a red frisbee.",
              "Dogs aren't sleeping, they're playing.", "two dogs chase a frisbee on the grass",
              "A dog's toy is a frisbee."],
        "3": ["A kitchen with a stove, a sink and a refrigerator.", "An empty kitchen with white cabinets.",
              "A small kitchen; stove and sink.", "The kitchen has wooden cabinets and a stove.",
              "a clean kitchen with appliances"],
        "4": ["A giraffe standing next to a tree.", "A tall giraffe eating leaves from a tree.",
              "One giraffe in a zoo enclosure.", "A giraffe by a tree in the grass.",
              "giraffe near trees on a sunny day"],
        "5": ["A plate of pizza on a table.", "A pizza with cheese and tomatoes.",
              "Someone's lunch: pizza and a soda.", "A sliced pizza sitting on a wooden table.",
              "pizza on a white plate"],
        "6": ["A red double-decker bus on the street.", "A bus driving down a city street.",
              "The red bus is parked near the curb.", "A large red bus in London.",
              "a double decker bus in traffic"],
    },
    {"1": "A man riding a wave on a surfboard.", "2": "Two dogs are playing with a frisbee.",
     "3": "A kitchen with a stove and a sink.", "4": "A giraffe standing in the grass near a tree.",
     "5": "A pizza on a plate.", "6": "A red bus driving down the street."},
)
SINGLE_REF = (
    {"a": ["A cat sitting on a couch."], "b": ["A man holding an umbrella."],
     "c": ["Three people on the beach."], "d": ["A black and white photo of a train."]},
    {"a": "A cat on a couch.", "b": "A person with an umbrella in the rain.",
     "c": "People walking on a beach.", "d": "A train."},
)
EMPTY_PRED = (
    {"1": ["A dog runs.", "A dog is running in a field."], "2": ["A bird on a branch.", ""],
     "3": ["A boat on the water.", "boats"], "4": ["A clock tower.", ""]},
    {"1": "A dog runs in a field.", "2": "", "3": "A boat.", "4": ""},
)
ONE_WORD = (
    {"1": ["A dog runs.", "dog"], "2": ["A bird on a branch.", "A small bird."],
     "3": ["Cats.", "Two cats sleeping."], "4": ["An apple on a table."]},
    {"1": "dog", "2": "bird", "3": "cats", "4": "table"},
)
REPEATED = (
    {"1": ["the dog and the dog and the dog", "a dog"], "2": ["a a a a a a", "a big big cat"],
     "3": ["one two one two one two", "two one"]},
    {"1": "dog dog dog dog dog dog dog", "2": "a a a a a a a a a a a a", "3": "one two one two"},
)
PUNCT_CAPS = (
    {"1": ["A MAN'S DOG -- RUNNING (FAST)!!!", "The man's dog can't stop: it's running..."],
       "2": ['She said, "Look at the U.S. flag!"', "A flag; red, white & blue."],
       "3": ["It's 5:30 p.m. -- time for tea?", "Tea-time at 5:30pm, isn't it?"],
       "4": ["Dr. Smith's cat (a Siamese) sleeps.", "A cat... asleep... on a mat!"]},
    {"1": "The Man's DOG isn't stopping!!", "2": 'A "red, white & blue" U.S. flag.',
     "3": "Tea time at 5:30 p.m.", "4": "A cat (Siamese) sleeps on a mat..."},
)


def _random_set(n_images: int = 200, seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)
    vocab = ["a", "the", "dog", "cat", "man", "on", "in", "red", "big", "runs", "sits", "grass",
             "Dog", "A", ",", ".", "and", "with", "it's", "park"]

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10)))

    refs = {f"img{i}": [sentence() for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    preds = {f"img{i}": sentence() for i in range(n_images)}
    return refs, preds


RANDOM = _random_set()
DATASETS = {"coco_like": COCO_LIKE, "single_ref": SINGLE_REF, "empty_pred": EMPTY_PRED,
            "one_word": ONE_WORD, "repeated": REPEATED, "punct_caps": PUNCT_CAPS, "random200": RANDOM}
TRICKY = [
    "A man's dog isn't \"running\" (fast) -- on the U.S. road, e-mail 3.5 km... cannot gonna!",
    "I'm sure they're here; we've seen 'em at 5:30 p.m. etc.", "Don't CAN'T won't Y'all o'clock ma'am",
    "rock 'n' roll in the '90s", "[x] {y} <z> & 50% off $10", "“Curly” ‘quotes’ — dashes – here…",
    "the U.K. and Mr. Smith. The end.", "I. The dog", "e.g. the 10-year-old T-shirt", "½ cup; 3/4 mile",
    "", "   ", "Hello World.", "dogs' toys and James' car", "x-ray of a co-op at Inc.",
]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _coco_tokenize(refs: dict, preds: dict) -> tuple[dict, dict]:
    """pycocoevalcap's own PTB tokenization (java), as COCOEvalCap.evaluate does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
    res = PTBTokenizer().tokenize({i: [{"caption": preds[i]}] for i in preds})
    return gts, res


def _coco_scores(gts: dict, res: dict) -> dict:
    """Corpus and per-image scores (x100) from pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    out = {}
    bleu, bleu_imgs = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        out[f"bleu{k + 1}"] = (100 * bleu[k], [100 * s for s in bleu_imgs[k]])
    for name, scorer in (("rouge_l", Rouge()), ("cider", Cider())):
        score, per = scorer.compute_score(gts, res)
        out[name] = (100 * float(score), [100 * float(s) for s in per])
    return out


def _tokenized(refs: dict, preds: dict) -> tuple[dict, dict]:
    """Same PTB-tokenized input for both implementations (java if present)."""
    if HAS_JAVA:
        return _coco_tokenize(refs, preds)
    gts = {i: cm.ptb_tokenize_python(refs[i]) for i in preds}
    return gts, {i: cm.ptb_tokenize_python([preds[i]]) for i in preds}


@pytest.mark.parametrize("name", list(DATASETS))
def test_scorers_match_cocoevalcap_on_same_tokens(name):
    pytest.importorskip("pycocoevalcap")
    gts, res = _tokenized(*DATASETS[name])
    ids = list(res)
    refs, hyps = [gts[i] for i in ids], [res[i][0] for i in ids]
    expected = _coco_scores(gts, res)
    corpus, per_bleu = cm.bleu_scores(refs, hyps)
    ours = {f"bleu{k + 1}": (100 * corpus[k], [100 * p[k] for p in per_bleu]) for k in range(4)}
    for key, scores in (("rouge_l", cm.rouge_l_scores(refs, hyps)), ("cider", cm.cider_d_scores(refs, hyps))):
        ours[key] = (100 * sum(scores) / len(scores), [100 * s for s in scores])
    for key, (exp_corpus, exp_per) in expected.items():
        assert _close(ours[key][0], exp_corpus), (key, ours[key][0], exp_corpus)
        assert len(ours[key][1]) == len(exp_per)
        assert all(_close(a, b) for a, b in zip(ours[key][1], exp_per)), key


@needs_java
def test_end_to_end_matches_cocoevalcap_pipeline():
    pytest.importorskip("pycocoevalcap")
    for name, (refs, preds) in DATASETS.items():
        m = cm.compute_caption_metrics(refs, preds, metrics=("bleu", "rouge_l", "cider"))
        assert m["tokenizer"] == "ptb-java"
        assert m["meteor"] is None and m["spice"] is None
        expected = _coco_scores(*_coco_tokenize(refs, preds))
        for key, (exp_corpus, exp_per) in expected.items():
            assert _close(m[key], exp_corpus), (name, key, m[key], exp_corpus)
            got_per = [m["per_image"][i][key] for i in preds]
            assert all(_close(a, b) for a, b in zip(got_per, exp_per)), (name, key)


@needs_java
def test_meteor_matches_cocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.meteor.meteor import Meteor
    refs, preds = {}, {}
    for name in ("coco_like", "empty_pred", "punct_caps", "repeated"):
        r, p = DATASETS[name]
        refs.update({f"{name}/{i}": v for i, v in r.items()})
        preds.update({f"{name}/{i}": v for i, v in p.items()})
    m = cm.compute_caption_metrics(refs, preds, metrics=("meteor",))
    assert m["meteor"] is not None, m["notes"]
    gts, res = _coco_tokenize(refs, preds)
    score, per = Meteor().compute_score(gts, res)
    assert _close(m["meteor"], 100 * score)
    assert all(_close(m["per_image"][i]["meteor"], 100 * s) for i, s in zip(preds, per))
    assert m["bleu4"] is None and m["cider"] is None


@needs_java
def test_python_ptb_equals_java_ptb():
    pytest.importorskip("pycocoevalcap")
    lines = TRICKY + [c for refs, preds in DATASETS.values() for i in preds for c in refs[i] + [preds[i]]]
    java = cm._ptb_java([lines], shutil.which("java"), cm._jar("tokenizer", "stanford-corenlp-3.4.1.jar"))[0]
    assert cm.ptb_tokenize_python(lines) == java
    # ...and our batched java call equals pycocoevalcap's own PTBTokenizer.
    gts, _ = _coco_tokenize({"x": TRICKY}, {"x": ""})
    assert java[:len(TRICKY)] == gts["x"]


@pytest.mark.parametrize("raw, expected", [
    ("A man's dog isn't running.", "a man 's dog is n't running"),
    ('She said, "Look!" (twice)', "she said look -lrb- twice -rrb-"),
    ("I cannot, we're gonna go...", "i can not we 're gon na go"),
    ("the U.S. flag -- red & blue; 50% off $10", "the u.s. flag red & blue 50 % off $ 10"),
    ("Two dogs' toys at 5:30 p.m. etc.", "two dogs toys at 5:30 p.m. etc."),
    ("in the U.S. The dog", "in the u.s. the dog"),
    ("“Curly” ‘quotes’ — dash…", "curly quotes dash"),
    ("e-mail T-shirt 3.5 ½ [x]", "e-mail t-shirt 3.5 1/2 -lsb- x -rsb-"),
    ("", ""),
])
def test_python_ptb_known_outputs(raw, expected):
    # Expected strings are what pycocoevalcap's (java) PTBTokenizer produces.
    assert cm.ptb_tokenize_python([raw]) == [expected]


def test_java_called_once_per_evaluation(monkeypatch):
    if not HAS_JAVA or cm._jar("tokenizer", "stanford-corenlp-3.4.1.jar") is None:
        pytest.skip("java PTB tokenizer unavailable")
    calls = []
    real_run = subprocess.run

    def counting_run(cmd, *a, **k):
        calls.append(cmd)
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(cm.subprocess, "run", counting_run)
    m = cm.compute_caption_metrics(*RANDOM, metrics=("cider",))
    assert m["tokenizer"] == "ptb-java"
    assert len([c for c in calls if "edu.stanford.nlp.process.PTBTokenizer" in c]) == 1


def test_python_fallback_when_java_missing(monkeypatch):
    monkeypatch.setattr(cm, "_java", lambda: None)
    refs, preds = PUNCT_CAPS
    m = cm.compute_caption_metrics(refs, preds)
    assert m["tokenizer"] == "ptb-python"
    assert m["meteor"] is None and m["spice"] is None
    assert any("pure-Python PTB" in n and "java not found" in n for n in m["notes"])
    assert any(n.startswith("METEOR skipped: java not found") for n in m["notes"])
    assert any(n.startswith("SPICE skipped") for n in m["notes"])
    forced = cm.compute_caption_metrics(refs, preds, tokenizer="ptb-python", metrics=("bleu", "cider"))
    assert forced["tokenizer"] == "ptb-python"
    assert forced["cider"] == pytest.approx(m["cider"], rel=1e-12)
    assert set(m["per_image"]) == set(preds) and m["per_image"]["1"]["cider"] >= 0


def test_spice_skipped_with_clear_note():
    m = cm.compute_caption_metrics(*SINGLE_REF, metrics=("spice",))
    if cm.spice_unavailable_reason() is None:
        pytest.skip("Stanford CoreNLP models are installed; SPICE would really run")
    assert m["spice"] is None
    notes = [n for n in m["notes"] if n.startswith("SPICE skipped")]
    assert len(notes) == 1
    if cm._cocoeval_dir() is not None and HAS_JAVA:
        assert "stanford-corenlp-3.6.0-models.jar" in notes[0]


def test_spice_reason_names_missing_models(monkeypatch, tmp_path):
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    (tmp_path / "spice" / "spice-1.0.jar").write_bytes(b"")
    monkeypatch.setattr(cm, "_cocoeval_dir", lambda: str(tmp_path))
    monkeypatch.setattr(cm, "_java", lambda: "/usr/bin/java")
    reason = cm.spice_unavailable_reason()
    assert reason is not None and str(tmp_path / "spice" / "lib") in reason
    for jar in cm.SPICE_MODEL_JARS:
        (tmp_path / "spice" / "lib" / jar).write_bytes(b"")
    assert cm.spice_unavailable_reason() is None


def test_validation_errors():
    refs = {"a": ["a dog"], "b": []}
    with pytest.raises(ValueError, match="'zzz'"):
        cm.compute_caption_metrics(refs, {"a": "dog", "zzz": "cat"}, tokenizer="ptb-python")
    with pytest.raises(ValueError, match="empty reference list.*'b'"):
        cm.compute_caption_metrics(refs, {"b": "dog"}, tokenizer="ptb-python")
    with pytest.raises(ValueError):
        cm.compute_caption_metrics({"a": ["x"]}, {}, tokenizer="ptb-python")
    with pytest.raises(ValueError, match="tokenizer"):
        cm.compute_caption_metrics({"a": ["x"]}, {"a": "x"}, tokenizer="nltk")
    with pytest.raises(ValueError, match="unknown metrics"):
        cm.compute_caption_metrics({"a": ["x"]}, {"a": "x"}, metrics=("bleu", "wer"))


def test_subset_and_extra_references_and_format():
    refs, preds = COCO_LIKE
    refs = dict(refs, extra=["an unused reference"])
    m = cm.compute_caption_metrics(refs, preds, tokenizer="ptb-python", metrics=("cider", "rouge_l"))
    assert m["bleu1"] is None and m["meteor"] is None and m["spice"] is None
    assert 0 < m["cider"] < 1000 and 0 < m["rouge_l"] <= 100
    assert set(m["per_image"]) == set(preds)
    assert any("1 reference id" in n for n in m["notes"])
    line = cm.format_metrics(m)
    assert line.startswith(f"ROUGE-L {m['rouge_l']:.2f} | CIDEr {m['cider']:.2f} | n=6 | tok=ptb-python")
    assert line.endswith("skipped: BLEU-1, BLEU-4, METEOR, SPICE") and "\n" not in line
