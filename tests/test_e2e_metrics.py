"""e2e_metrics: fidelity to the official scorer, hand-computed tiny cases, v13a tokenisation, the no-Java fallback."""

import json
import math

import pytest
from conftest import SHARED

from gpt2study import e2e_metrics
from gpt2study.e2e_metrics import bleu_nist, format_scores, mteval_tokenize, read_outputs, read_references, score
from model import UserError

E2E = SHARED / "data" / "e2e"
needs_java = pytest.mark.skipif(not e2e_metrics.java_available(), reason="Java not found: official METEOR/PTB need it")


@pytest.fixture(scope="module")
def reference_system():
    """The shared reference system (TGen) outputs, the test references and the official scorer's numbers."""
    if not (E2E / "reference" / "official_scores.json").is_file():
        pytest.skip(f"shared E2E data not found at {E2E}")
    official = json.loads((E2E / "reference" / "official_scores.json").read_text())["scores"]
    outputs = read_outputs(E2E / "reference" / "tgen_test_outputs.txt")
    return outputs, read_references(E2E / "testset_w_refs.csv"), official


@pytest.fixture(scope="module")
def official_run(reference_system):
    if not e2e_metrics.java_available():
        pytest.skip("Java not found: the official METEOR and PTB tokeniser need it")
    outputs, refs, _ = reference_system
    return score(outputs, refs, official=True)  # once per session: the Java METEOR run takes seconds


# ----------------------------------------------------------------------------- fidelity

TOLERANCE = {"BLEU": 5e-4, "NIST": 5e-3, "METEOR": 5e-4, "ROUGE_L": 5e-4, "CIDEr": 5e-3}


@pytest.mark.parametrize("metric", list(TOLERANCE))
def test_matches_official_scorer(reference_system, official_run, metric):
    assert official_run["official"] is True
    assert official_run[metric] == pytest.approx(reference_system[2][metric], abs=TOLERANCE[metric])


def test_bleu_nist_match_official_without_java(reference_system):
    outputs, refs, official = reference_system
    bleu, nist = bleu_nist(outputs, refs)
    assert bleu == pytest.approx(official["BLEU"], abs=5e-4)
    assert nist == pytest.approx(official["NIST"], abs=5e-3)


def test_references_grouped_like_the_official_scorer(reference_system):
    outputs, refs, _ = reference_system
    assert len(outputs) == len(refs) == 630
    assert sum(map(len, refs)) == 4693


# ----------------------------------------------------------------------------- hand-computed BLEU and NIST


def test_bleu_tiny_corpus():
    # seg 1: hyp "the cat sat on the mat" / ref "the cat is on the mat" (6 words each)
    #   1-grams 5/6 (sat unmatched), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3
    # seg 2: hyp = ref "a dog barks": 3/3, 2/2, 1/1, and no 4-gram at all
    # corpus: 8/9, 5/7, 2/5, 0/3 -> v13a smoothing turns the first zero count into 1/(2*3);
    # hypothesis and closest reference lengths are both 9, so no brevity penalty.
    bleu, _ = bleu_nist(["The cat sat on the mat", "a dog barks"], [["the cat is on the mat"], ["A dog barks"]])
    assert bleu == pytest.approx((8 / 9 * 5 / 7 * 2 / 5 * 1 / 6) ** 0.25, abs=1e-12)


def test_bleu_closest_reference_length_and_empty_orders():
    # hyp "the cat" (2 words); refs of 3 and 6 words: the closest is 3 -> BP = exp(1 - 3/2).
    # v13a counts an n-gram order the hypothesis lacks (3-, 4-grams) as precision 1.
    bleu, _ = bleu_nist(["the cat"], [["the cat sat", "a cat is on the mat"]])
    assert bleu == pytest.approx(math.exp(1 - 3 / 2), abs=1e-12)
    # ties go to the shorter reference: hyp 4 words, refs 3 and 5 words -> 3, so no penalty (4 > 3)
    bleu, _ = bleu_nist(["a b c d"], [["a b c d e", "a b c"]])
    assert bleu == pytest.approx(1.0)


def _nist_penalty(ratio):
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def test_nist_tiny_case():
    # ref "a b a c": counts a 2, b 1, c 1 of 4 words; bigram "a b" once.
    # info(a) = log2(4/2) = 1, info(b) = log2(4/1) = 2, info(a b) = log2(count(a)/count(a b)) = 1.
    # hyp "a b": unigrams (1 + 2) / 2 words + bigrams 1 / 1 = 2.5; length ratio 2 / 4 -> penalty.
    _, nist = bleu_nist(["a b"], [["a b a c"]])
    assert nist == pytest.approx(2.5 * _nist_penalty(2 / 4), abs=1e-12)
    assert _nist_penalty(2 / 3) == pytest.approx(0.5)  # by construction of beta


def test_nist_reference_length_uses_mean_reference_count():
    # refs: "a b", "a b" | "c d": a 2, b 2, c 1, d 1 of 6 words; bigrams a b 2, c d 1.
    # matched: a, b (log2 3 each), c (log2 6) over 3 hypothesis words; bigram "a b" has info log2(2/2) = 0.
    # reference length = 6 words / 1.5 refs per segment = 4 (not 6 / 2 refsets = 3) -> ratio 3/4.
    _, nist = bleu_nist(["a b", "c"], [["a b", "a b"], ["c d"]])
    expected = (2 * math.log2(3) + math.log2(6)) / 3 * _nist_penalty(3 / 4)
    assert nist == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- v13a tokenisation


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, World.", "hello , world ."),
        ("It costs £20-25.", "it costs £20 - 25 ."),  # dash split after a digit; period before a space
        ("1,000.50 or 3.5, not 7", "1,000.50 or 3.5 , not 7"),  # , and . between digits stay
        ("x.5 and 5.x", "x . 5 and 5 . x"),
        ("e.g. U.S.A.", "e . g . u . s . a ."),
        ("state-of-the-art a-3 3-a", "state-of-the-art a-3 3 - a"),
        ("don't (a) [b] {c} x/y 50% #1 @home", "don't ( a ) [ b ] { c } x / y 50 % # 1 @ home"),
        ("&quot;Hi&quot; &amp; &lt;b&gt;", '" hi " & < b >'),
        ("<skipped>co-\noperate\nnow", "cooperate now"),
        ("ÉCOLE Café", "École café"),  # Perl's tr/[A-Z]/[a-z]/ lowercases ASCII only
        ("  spaced \t out  ", "spaced out"),
    ],
)
def test_mteval_v13a_tokenization(text, tokens):
    assert mteval_tokenize(text) == tokens.split()


# ----------------------------------------------------------------------------- ROUGE_L, METEOR, CIDEr


def test_rouge_l_lcs_tiny_case():
    # COCO ROUGE-L takes the best precision and the best recall over the references separately:
    # ref 1 LCS "the cat on the mat" = 5 -> P 5/6, R 5/6; ref 2 "cat sat" LCS 2 -> P 2/6, R 2/2.
    # F = (1 + b^2) P R / (R + b^2 P) with b = 1.2, P = 5/6, R = 1. (Same scorer as the official path.)
    scores = score(["the cat sat on the mat"], [["the cat is on the mat", "cat sat"]], official=False)
    p, r, b2 = 5 / 6, 1.0, 1.2**2
    assert scores["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-12)


PERFECT = [
    "The Eagle is a coffee shop near the river.",
    "Alimentum serves cheap Italian food\u2028in the city centre.",  # a line break must not misalign PTB's lines
    "Zizzi is not family-friendly.",
]


@needs_java
def test_perfect_match_gives_each_maximum(monkeypatch):
    # METEOR 1.5 sets fragmentation to 0 for an exact match, so 1.0; CIDEr-D of identical hypothesis and
    # reference TF-IDF vectors is cosine 1 for each n-gram order, times 10.
    from pycocoevalcap.meteor import meteor

    started, original_init = [], meteor.Meteor.__init__

    def init(self):
        original_init(self)
        started.append(self.meteor_p)

    monkeypatch.setattr(meteor.Meteor, "__init__", init)
    scores = score(PERFECT, [[s] for s in PERFECT], official=True)
    assert scores["official"] is True
    for metric, maximum in {"BLEU": 1.0, "METEOR": 1.0, "ROUGE_L": 1.0, "CIDEr": 10.0}.items():
        assert scores[metric] == pytest.approx(maximum, abs=1e-6), metric
    assert len(started) == 1 and started[0].poll() is not None  # the METEOR JVM is stopped, not left to GC


# ----------------------------------------------------------------------------- fallback and output


def test_fallback_without_java(monkeypatch, capsys):
    monkeypatch.setattr(e2e_metrics, "java_available", lambda: False)
    outputs = ["The Eagle is a coffee shop.", "Zizzi is a pub near the river.", ""]
    refs = [["The Eagle is a coffee shop.", "A coffee shop: The Eagle."], ["Zizzi is a pub."], ["Strada is cheap."]]
    scores = score(outputs, refs)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "Java" in warning[0] and "apt-get install default-jre-headless" in warning[0]
    assert scores["official"] is False and set(scores["unofficial"]) == {"METEOR", "ROUGE_L", "CIDEr"}
    assert all(math.isfinite(scores[m]) for m in e2e_metrics.METRICS)
    text = format_scores(scores)
    assert "BLEU: " in text and "BLEU: " + f"{scores['BLEU']:.4f}\n" in text  # BLEU needs no Java: unmarked
    assert f"METEOR: {scores['METEOR']:.4f}*" in text and f"CIDEr: {scores['CIDEr']:.4f}*" in text
    assert text.splitlines()[-1].startswith("* unofficial")
    with pytest.raises(UserError, match="need Java"):
        score(outputs, refs, official=True)


def test_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv(e2e_metrics.NO_JAVA_ENV, "1")
    assert not e2e_metrics.java_available()


def test_fallback_close_to_official(reference_system):
    # Only the tokeniser differs for ROUGE_L and CIDEr; METEOR lacks paraphrases and function-word weights.
    outputs, refs, official = reference_system
    scores = score(outputs, refs, official=False)
    assert scores["ROUGE_L"] == pytest.approx(official["ROUGE_L"], abs=0.005)
    assert scores["CIDEr"] == pytest.approx(official["CIDEr"], abs=0.02)
    assert scores["METEOR"] == pytest.approx(official["METEOR"], abs=0.05)


def test_format_official_scores_unmarked():
    scores = {"BLEU": 0.66161, "NIST": 8.5446, "METEOR": 0.4504, "ROUGE_L": 0.6914, "CIDEr": 2.2312, "official": True}
    assert format_scores(scores) == "BLEU: 0.6616\nNIST: 8.5446\nMETEOR: 0.4504\nROUGE_L: 0.6914\nCIDEr: 2.2312"


def test_count_mismatch_and_outputs_file(tmp_path):
    with pytest.raises(UserError, match="2 system outputs but 1 reference groups"):
        score(["a", "b"], [["a"]], official=False)
    path = tmp_path / "out.txt"
    path.write_text(" first output \nsecond\n", encoding="utf-8")
    assert read_outputs(path) == ["first output", "second"]
    with pytest.raises(UserError, match="not found"):
        read_outputs(tmp_path / "missing.txt")
