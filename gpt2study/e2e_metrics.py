"""The E2E NLG Challenge metrics, as the official scorer (tuetschek/e2e-metrics, measure_scores.py) computes them.

BLEU and NIST: a Python port of the MT-Eval v13a Perl script in the variant that scorer ships
(mteval-v13a-sig.pl): v13a tokenisation, lowercased, corpus level, BLEU-4 with the closest-reference
brevity penalty, NIST-5 with information weights from the reference n-gram counts.
METEOR, ROUGE_L, CIDEr (CIDEr-D): pycocoevalcap's scorers after its Stanford PTB tokeniser, as the
MS-COCO caption evaluation that scorer runs. METEOR 1.5 and the PTB tokeniser are Java programs.

Without Java, `score` warns once on stderr and falls back to unofficial METEOR/ROUGE_L/CIDEr (see
`_fallback_scores`); the result then carries "official": False and `format_scores` marks those values.
BLEU and NIST need no Java and are official either way.
"""

import math
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from gpt2study.e2e_release import group_by_mr, parse_pairs_csv, read_split
from model import UserError

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
JAVA_METRICS = ("METEOR", "ROUGE_L", "CIDEr")  # those whose official form needs Java (METEOR jar, PTB tokeniser)
NO_JAVA_ENV = "E2E_METRICS_NO_JAVA"  # set to 1 to test the fallback on a machine that has Java
JAVA_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless` or `conda install openjdk`"
FOOTNOTE = (
    "* unofficial: computed without Java (a Python tokeniser instead of the PTB tokeniser; METEOR from nltk "
    "without paraphrases or synonyms; ROUGE_L from rouge-score); not comparable with published E2E scores"
)


def java_available() -> bool:
    return shutil.which("java") is not None and os.environ.get(NO_JAVA_ENV, "") in ("", "0")


# ----------------------------------------------------------------------------- reading


def read_outputs(path) -> list[str]:
    """System outputs, one per line, stripped (as the official scorer reads a plain-text output file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"outputs file '{path}' not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"outputs file '{path}' is not UTF-8 ({e})") from None
    return [line.strip() for line in text.splitlines()]


def read_test_set(path) -> list[tuple[str, list[str]]]:
    """(MR, its references), one per MR in file order, from a testset_w_refs-style CSV (or the release zip/folder)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        pairs = parse_pairs_csv(path.read_bytes(), str(path))
    else:
        pairs = read_split(path, "test")
    return group_by_mr(pairs)


def read_references(path) -> list[list[str]]:
    """Reference groups, one per MR in file order (see read_test_set)."""
    return [refs for _, refs in read_test_set(path)]


# ----------------------------------------------------------------------------- BLEU and NIST (mteval-v13a)

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# v13a's punctuation class [\{-\~\[-\` -\&\(-\+\:-\@\/]: ASCII symbols except ' - . , and digits/letters.
_V13A_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of `text` as mteval-v13a's default (non-international) `tokenization`, lowercased as without -c."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} ".translate(_ASCII_LOWER)  # Perl's tr/[A-Z]/[a-z]/ leaves non-ASCII letters alone
    text = _V13A_PUNCT.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)  # period/comma unless preceded by a digit
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)  # period/comma unless followed by a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # dash after a digit
    return text.split()


def _ngrams(words: list[str], n_max: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def _closest_ref_length(ref_lengths: list[int], hyp_length: int) -> int:
    # mteval-v13a-sig: the first reference starts, later ones replace it when closer to the hypothesis
    # length (ties: the shorter); empty references (the scorer's padding) are skipped.
    best = ref_lengths[0]
    for length in ref_lengths[1:]:
        if length and (abs(hyp_length - length), length) < (abs(hyp_length - best), best):
            best = length
    return best


def bleu_nist(outputs: list[str], refs: list[list[str]]) -> tuple[float, float]:
    """Corpus BLEU-4 and NIST-5 exactly as mteval-v13a-sig.pl in the official E2E scorer."""
    # The scorer writes SGML files whose reader collapses whitespace runs before tokenising.
    hyps = [mteval_tokenize(" ".join(o.split())) for o in outputs]
    refs_tok = [[mteval_tokenize(" ".join(r.split())) for r in group] for group in refs]

    # NIST information weights from all reference n-grams: info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)).
    ref_counts: Counter = Counter()
    for group in refs_tok:
        for words in group:
            ref_counts.update(_ngrams(words, 5))
    total_words = sum(len(words) for group in refs_tok for words in group)

    def info(ngram: tuple) -> float:
        # Perl tests the prefix string for truth, so a prefix that is the word "0" counts as no prefix.
        has_prefix = len(ngram) > 1 and ngram[:-1] != ("0",)
        prefix_count = ref_counts[ngram[:-1]] if has_prefix else total_words
        return math.log2(prefix_count / ref_counts[ngram])

    match, hyp_total, info_sum = [0] * 6, [0] * 6, [0.0] * 6
    ref_length = ref_words = nonempty_refs = 0
    for hyp, group in zip(hyps, refs_tok):
        hyp_counts = _ngrams(hyp, 5)
        max_ref: Counter = Counter()
        for words in group:
            max_ref |= _ngrams(words, 5)  # per-n-gram maximum over the references
        for n in range(1, 6):
            hyp_total[n] += max(len(hyp) - n + 1, 0)
        for ngram, count in hyp_counts.items():
            if ngram in max_ref:
                clipped = min(count, max_ref[ngram])
                match[len(ngram)] += clipped
                info_sum[len(ngram)] += clipped * info(ngram)
        ref_length += _closest_ref_length([len(words) for words in group], len(hyp))
        ref_words += sum(len(words) for words in group)
        nonempty_refs += sum(1 for words in group if words)

    # BLEU with v13a's smoothing: a zero n-gram match count becomes 1/2^k (k-th such n), never log(0).
    log_precision, smooth = 0.0, 1
    for n in range(1, 5):
        if hyp_total[n] == 0:
            continue
        if match[n] == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * hyp_total[n]))
        else:
            log_precision += math.log(match[n] / hyp_total[n])
    brevity = math.exp(min(0.0, 1 - ref_length / hyp_total[1])) if hyp_total[1] else 0.0
    bleu = math.exp(log_precision / 4) * brevity

    # NIST: the reference length is the total reference words over the mean number of non-empty
    # references per segment (the -sig variant's nsys), compared with the corpus hypothesis length.
    nist = sum(info_sum[n] / max(hyp_total[n], 1) for n in range(1, 6))
    mean_refs = nonempty_refs / len(refs_tok)
    ratio = hyp_total[1] / (ref_words / mean_refs) if ref_words else 0.0
    if ratio <= 0:
        nist = 0.0
    elif ratio < 1:
        beta = -math.log(0.5) / math.log(1.5) ** 2  # penalty 0.5 at 2/3 of the reference length
        nist *= math.exp(-beta * math.log(ratio) ** 2)
    return bleu, nist


# ----------------------------------------------------------------------------- METEOR, ROUGE_L, CIDEr


# The PTB tokeniser reads one caption a line and also breaks lines at these, which would misalign captions.
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def _coco_dicts(outputs, refs) -> tuple[dict, dict]:
    gts = {i: [{"caption": _LINE_BREAKS.sub(" ", r)} for r in group] for i, group in enumerate(refs)}
    res = {i: [{"caption": _LINE_BREAKS.sub(" ", o)}] for i, o in enumerate(outputs)}
    return gts, res


def _meteor_java(gts: dict, res: dict) -> float:
    meteor = Meteor()
    process = meteor.meteor_p
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:
        error = (
            process.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            if process.poll() is not None
            else []
        )
        raise RuntimeError(f"METEOR (java) failed: {e} {' '.join(error)}") from e
    finally:
        # Meteor only stops its JVM in __del__; stop it now rather than whenever it is collected.
        process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    return float(score)


def _coco_official(outputs, refs) -> dict:
    gts, res = _coco_dicts(outputs, refs)
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    return {
        "METEOR": _meteor_java(gts, res),
        "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
    }


# Roughly the PTB tokeniser's words: clitics split off (n't, 's), hyphenated words and decimals kept.
_FALLBACK_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'\w+|\w+(?:[-.]\w+)*|[^\w\s]")


def fallback_tokenize(text: str) -> list[str]:
    """Lowercased words without the punctuation tokens COCO's evaluation drops: a Java-free PTB stand-in."""
    return [t for t in _FALLBACK_TOKEN.findall(text.lower()) if t not in PUNCTUATIONS]


# METEOR 1.5's parameters for English (alpha, beta, gamma); nltk's defaults are the original METEOR's.
_METEOR_EN = {"alpha": 0.85, "beta": 0.2, "gamma": 0.6}


class _NoSynonyms:
    """Stands in for nltk's WordNet, whose data cannot be downloaded here: METEOR keeps exact and stem matches."""

    @staticmethod
    def synsets(word):
        return []


def _fallback_scores(outputs, refs) -> dict:
    """Unofficial METEOR, ROUGE_L, CIDEr without Java.

    CIDEr is the very pycocoevalcap scorer of the official path (plain Python), so only the tokenisation
    differs. ROUGE_L takes rouge-score's LCS precision and recall against each reference and combines them as
    COCO does (the best precision and the best recall over the references, F with beta 1.2). METEOR is nltk's
    with METEOR 1.5's English parameters but only exact and Porter-stem matches, best reference per segment,
    averaged over segments; METEOR 1.5 also matches paraphrases, weights function words less and aggregates
    its statistics over the corpus.
    """
    from nltk.translate.meteor_score import meteor_score  # slow to import; only the fallback needs it
    from rouge_score import rouge_scorer

    hyp_tokens = [fallback_tokenize(o) for o in outputs]
    ref_tokens = [[fallback_tokenize(r) for r in group] for group in refs]
    gts = {i: [" ".join(r) for r in group] for i, group in enumerate(ref_tokens)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyp_tokens)}
    no_synonyms = _NoSynonyms()
    meteor = [meteor_score(group, hyp, wordnet=no_synonyms, **_METEOR_EN) for hyp, group in zip(hyp_tokens, ref_tokens)]
    lcs = rouge_scorer.RougeScorer(["rougeL"])
    rouge = []
    for hyp, group in zip(outputs, refs):
        pr = [lcs.score(ref, hyp)["rougeL"] for ref in group]
        p, r = max(s.precision for s in pr), max(s.recall for s in pr)
        rouge.append((1 + 1.2**2) * p * r / (r + 1.2**2 * p) if p and r else 0.0)
    return {
        "METEOR": sum(meteor) / len(meteor),
        "ROUGE_L": sum(rouge) / len(rouge),
        "CIDEr": float(Cider().compute_score(gts, res)[0]),
    }


# ----------------------------------------------------------------------------- scoring


def score(outputs: list[str], refs: list[list[str]], official: bool | None = None) -> dict:
    """The five E2E metrics on the official scale (BLEU, METEOR, ROUGE_L in 0-1).

    official: True requires Java, False uses the Python fallback, None (default) picks by Java's presence.
    The result also holds "official" (bool) and "unofficial" (the metric names computed without Java).
    """
    if len(outputs) != len(refs):
        raise UserError(f"{len(outputs)} system outputs but {len(refs)} reference groups (MRs): counts must match")
    if not refs or any(not group for group in refs):
        raise UserError("every output needs at least one reference")
    has_java = java_available()
    if official and not has_java:
        raise UserError(f"official E2E scores need Java (METEOR 1.5 and the PTB tokeniser): {JAVA_HINT}")
    if official is None and not has_java:
        print(
            f"warning: Java not found: the official METEOR and PTB tokeniser need it ({JAVA_HINT}); "
            "METEOR, ROUGE_L and CIDEr are unofficial fallbacks (marked *)",
            file=sys.stderr,
        )
    use_java = has_java if official is None else official
    bleu, nist = bleu_nist(outputs, refs)
    coco = _coco_official(outputs, refs) if use_java else _fallback_scores(outputs, refs)
    unofficial = [] if use_java else list(JAVA_METRICS)
    return {"BLEU": bleu, "NIST": nist, **coco, "official": not unofficial, "unofficial": unofficial}


def format_scores(scores: dict) -> str:
    """'METRIC: value' lines as the official scorer prints them; unofficial values get '*' and a footnote."""
    unofficial = scores.get("unofficial", [] if scores.get("official", True) else JAVA_METRICS)
    lines = [f"{m}: {scores[m]:.4f}{'*' if m in unofficial else ''}" for m in METRICS]
    if unofficial:
        lines.append(FOOTNOTE)
    return "\n".join(lines)
