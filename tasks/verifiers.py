"""Verifiers: ``f(completions, answer, **columns) -> list[float]``, the shape TRL reward functions use.

The verifier of a task is both its evaluation metric and its RL reward.
"""

from __future__ import annotations

import importlib
import math
import re
from functools import partial
from typing import Callable

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")

VERIFIER_KINDS = ("exact", "numeric", "regex", "function", "rouge_l", "sari", "edit_sim", "math")


def exact_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion equals the reference answer exactly (no normalisation)."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


WORKED_SEP = "|"
_WORKED_FORMAT = re.compile(r"^[^|]+\|[^|]+$")


def worked_final(completion: str) -> str | None:
    """The final answer of a worked-steps completion: the text after the last ``|`` (None without one)."""
    return completion.rpartition(WORKED_SEP)[2] if WORKED_SEP in completion else None


def worked_answer_match(completions: list[str], final: list[str], **_) -> list[float]:
    """1.0 where the worked-steps completion's final answer equals the reference ``final`` exactly."""
    return [float(worked_final(c) == a) for c, a in zip(completions, final, strict=True)]


def worked_format(completions: list[str], **_) -> list[float]:
    """1.0 where the completion is ``<steps>|<answer>``: some working, one separator, an answer."""
    return [float(bool(_WORKED_FORMAT.match(c))) for c in completions]


def worked_reward(completions: list[str], final: list[str], accuracy_weight: float = 0.9, **_) -> list[float]:
    """RL reward for prompts that ask for working: ``0.9 * accuracy + 0.1 * format`` (RFT-CPT's split)."""
    acc = worked_answer_match(completions, final)
    fmt = worked_format(completions)
    return [accuracy_weight * a + (1 - accuracy_weight) * f for a, f in zip(acc, fmt)]


def numeric_match(
    completions: list[str], answer: list[str], rel_tol: float = 1e-6, abs_tol: float = 1e-9, **_
) -> list[float]:
    """1.0 where the last number in the completion equals the numeric answer within tolerance."""
    scores = []
    for c, a in zip(completions, answer, strict=True):
        found = _NUMBER.findall(c)
        try:
            ok = bool(found) and math.isclose(float(found[-1]), float(a), rel_tol=rel_tol, abs_tol=abs_tol)
        except ValueError:
            ok = False
        scores.append(float(ok))
    return scores


def regex_match(completions: list[str], answer: list[str], pattern: str, **_) -> list[float]:
    """Extract the first group of ``pattern`` (or the whole match) from the completion, compare exactly."""
    rx = re.compile(pattern)
    scores = []
    for c, a in zip(completions, answer, strict=True):
        m = rx.search(c)
        got = None if m is None else (m.group(1) if rx.groups else m.group(0))
        scores.append(float(got is not None and got.strip() == str(a).strip()))
    return scores


# Text-generation metrics of real benchmarks (TRACE: ROUGE-L for MeetingBank, SARI for 20Minuten, edit
# similarity for Py150; math answers by equivalence). Each returns one score in [0, 1] per completion, so it
# serves as metric and as RL reward. The libraries are the `real` extra: `pip install -e ".[real]"`.

def _needs(module: str, metric: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"verifier '{metric}' needs the package '{module}': pip install -e \".[real]\"") from None


def rouge_l(completions: list[str], answer: list[str], **_) -> list[float]:
    """ROUGE-L F-measure of each completion against its reference (``rouge-score``'s ``rougeL``, its default
    tokenizer: lowercased alphanumeric words; no stemming)."""
    scorer = _needs("rouge_score.rouge_scorer", "rouge_l").RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(a, c)["rougeL"].fmeasure for c, a in zip(completions, answer, strict=True)]


def edit_similarity(completions: list[str], answer: list[str], **_) -> list[float]:
    """Character-level similarity ``1 - indel_distance / (len(a) + len(b))`` (``rapidfuzz.fuzz.ratio`` / 100,
    the edit similarity TRACE reports for code completion), on whitespace-stripped strings."""
    fuzz = _needs("rapidfuzz.fuzz", "edit_sim")
    return [fuzz.ratio(c.strip(), a.strip()) / 100.0 for c, a in zip(completions, answer, strict=True)]


def _ngrams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _sari_ngram(src: list[str], out: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) at one n-gram order (Xu et al. 2016, Eq. 3-5). Counts of
    source and output n-grams are multiplied by the number of references, so a kept or deleted n-gram is
    weighted by the share of references that keep or delete it; an empty operation scores 1 (0/0 := 1)."""
    from collections import Counter

    k = len(refs)
    ref_all = Counter(g for r in refs for g in r)
    s = Counter({g: c * k for g, c in Counter(src).items()})
    o = Counter({g: c * k for g, c in Counter(out).items()})
    keep_sys, keep_ref = s & o, s & ref_all
    keep_good = keep_sys & ref_all
    keep_p = sum(keep_good[g] / keep_sys[g] for g in keep_good) / len(keep_sys) if keep_sys else 1.0
    keep_r = sum(keep_good.values()) / sum(keep_ref.values()) if keep_ref else 1.0
    del_sys = s - o
    del_good = del_sys - ref_all
    del_p = sum(del_good[g] / del_sys[g] for g in del_good) / len(del_sys) if del_sys else 1.0
    add_sys = set(o) - set(s)
    add_ref = set(ref_all) - set(s)
    add_good = add_sys & set(ref_all)
    add_p = len(add_good) / len(add_sys) if add_sys else 1.0
    add_r = len(add_good) / len(add_ref) if add_ref else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari_sentence(source: str, output: str, references: list[str], tokenize: bool = True) -> float:
    """SARI in [0, 1] of one output: the mean over n = 1..4 of keep F1, deletion precision and addition F1,
    averaged over the three operations (Xu et al. 2016, "Optimizing Statistical Machine Translation for Text
    Simplification", TACL 4). The variant of tensor2tensor and Hugging Face ``evaluate``: keep recall counts
    kept reference n-grams once per occurrence, and text is lowercased and split by sacrebleu's 13a
    tokenizer first (``tokenize=False``: lowercased and split on spaces only)."""
    def words(text: str) -> list[str]:
        text = text.lower()
        if tokenize:
            from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

            text = Tokenizer13a()(text)
        return text.split(" ")

    src, out, refs = words(source), words(output), [words(r) for r in references]
    parts = [_sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(r, n) for r in refs]) for n in range(1, 5)]
    keep, dele, add = (sum(p[i] for p in parts) / 4 for i in range(3))
    return (keep + dele + add) / 3


def sari(completions: list[str], answer: list[str], source: list[str] | None = None,
         prompt: list[str] | None = None, references: list[list[str]] | None = None, **_) -> list[float]:
    """SARI of each completion (:func:`sari_sentence`): the text to simplify is the row's ``source`` column
    (else its prompt); the references are its ``references`` column (a list) where present, else its answer."""
    src = source if source is not None else prompt
    if src is None:
        raise ValueError("verifier 'sari' needs a 'source' (or 'prompt') column: the text being simplified")
    refs = references if references is not None else [[a] for a in answer]
    _needs("sacrebleu", "sari")
    return [sari_sentence(s, c, list(r)) for c, s, r in zip(completions, src, refs, strict=True)]


def math_equivalent(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where ``math-verify`` finds the completion's final answer (its last ``\\boxed{}`` or LaTeX/plain
    expression) equivalent to the reference (numbers, fractions, sets, intervals, symbolic expressions)."""
    mv = _needs("math_verify", "math")
    scores = []
    for c, a in zip(completions, answer, strict=True):
        gold = mv.parse(a if "$" in a else f"${a}$")  # a bare reference is read as LaTeX math
        try:
            scores.append(float(bool(gold) and mv.verify(gold, mv.parse(c))))
        except Exception:  # an unparseable completion is wrong, not a crash of the run
            scores.append(0.0)
    return scores


_TEXT_METRICS = {"rouge_l": rouge_l, "sari": sari, "edit_sim": edit_similarity, "math": math_equivalent}


def import_function(path: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"package.module.function"``)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"verifier function '{path}' must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier function '{path}' cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"verifier function '{path}' is not callable")
    return fn


def make_verifier(kind: str = "exact", pattern: str | None = None, function: str | None = None) -> Callable:
    """Build a verifier by name: ``exact``, ``numeric``, ``regex`` (needs ``pattern``), ``function``,
    ``rouge_l``, ``sari``, ``edit_sim``, ``math``."""
    if kind == "exact":
        return exact_match
    if kind == "numeric":
        return numeric_match
    if kind == "regex":
        if not pattern:
            raise ValueError("verifier 'regex' needs a 'pattern'")
        re.compile(pattern)
        return partial(regex_match, pattern=pattern)
    if kind in _TEXT_METRICS:
        return _TEXT_METRICS[kind]
    if kind == "function":
        if not function:
            raise ValueError("verifier 'function' needs 'function: package.module:function'")
        return import_function(function)
    raise ValueError(f"unknown verifier '{kind}'; allowed: {', '.join(VERIFIER_KINDS)}")
