"""Verifiers: ``f(completions, answer, **columns) -> list[float]``, the shape TRL reward functions use.

The verifier of a task is both its evaluation metric and its RL reward.
"""

from __future__ import annotations

import importlib
import math
import re
import string
from functools import partial
from typing import Callable

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")

VERIFIER_KINDS = ("exact", "numeric", "regex", "function", "rouge_l", "sari", "edit_sim", "math", "choice", "vqa",
                  "loose_text", "last_number", "label")


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


# Multimodal benchmarks, scored as their papers' evaluation code scores them.

def choice_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """Multiple choice (ScienceQA as lmms-eval scores it for LLaVA): the reference is an option letter; the
    completion is right when it is that letter (any case) or starts with the upper-case letter and a period
    (``"B. the moon"``). Anything else, even the option's text, is wrong."""
    scores = []
    for c, a in zip(completions, answer, strict=True):
        pred, target = c.strip(), a.strip().lower()
        if pred.lower() == target:
            scores.append(1.0)
        elif len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
            scores.append(float(pred[0].lower() == target))
        else:
            scores.append(0.0)
    return scores


# The VQA answer normalisation (the VQA challenge's evaluation, as EvalAI, MMF and lmms-eval apply it to
# VQAv2, TextVQA and VizWiz): spelled-out numbers to digits, articles dropped, apostrophe-less contractions
# restored, punctuation removed (or turned into a space between words).
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = ("a", "an", "the")
_VQA_CONTRACTIONS = dict(x.split(":") for x in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's "
    "howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd "
    "itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
    "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've "
    "twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll "
    "whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've "
    "whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll "
    "whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've "
    "wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll "
    "youre:you're youve:you've").split())
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (the lookbehind is the
# original's typo, a literal "!<=" lookahead, kept so that scores match the reference implementation)
_VQA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text: str) -> str:
    """One answer as the VQA evaluation compares it: lower-cased, commas and question marks dropped, "'s"
    split off, then the punctuation, number, article and contraction rules above (MMF's EvalAI answer
    processor, which TextVQA's evaluator and lmms-eval use; a test checks it against lmms-eval's copy)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:  # a mark beside a space (or any mark, in a "1,000"-style number) goes; else a space
        if (p + " " in text or " " + p in text) or _VQA_COMMA_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out, 32)  # at most 32 periods: the reference passes re.UNICODE (32) as count
    words = []
    for w in out.split():
        w = _VQA_NUMBERS.get(w, w)
        if w not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(completions: list[str], answer: list[str], answers: list | None = None, **_) -> list[float]:
    """VQA accuracy (TextVQA, VizWiz, VQAv2): with the human answers of a question (``answers``, usually 10),
    the mean over leaving each one out of ``min(1, #others equal to the completion / 3)``, every string
    normalised by :func:`vqa_normalize`; with one reference (GQA, or no ``answers`` column) exact match after
    normalisation (an answer that normalises to nothing matches nothing). The formula is the benchmarks' for
    10 answers; with 2-9 references it caps below 1 (three identical references: 2/3)."""
    refs = answers if answers is not None else [[a] for a in answer]
    scores = []
    for c, gts in zip(completions, refs, strict=True):
        pred = vqa_normalize(c)
        gts = [vqa_normalize(g) for g in (gts if isinstance(gts, (list, tuple)) else [gts])]
        if len(gts) <= 1:
            scores.append(float(bool(gts) and gts[0] != "" and pred == gts[0]))
            continue
        accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
        scores.append(sum(accs) / len(accs))
    return scores


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_PUNCT_RUN = re.compile("[%s]" % re.escape(string.punctuation))


def strip_think(text: str) -> str:
    """``text`` without its ``<think>...</think>`` spans."""
    return _THINK.sub(" ", text or "")


def _loose_normalize(text: str) -> str:
    return re.sub(r"\s+", " ", _PUNCT_RUN.sub(" ", strip_think(text).lower())).strip()


def loose_text_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """MLLM-CTBench's text scoring (art, OCR, science, medical): both sides without ``<think>`` spans,
    lower-cased, punctuation to spaces; right when the reference is inside the completion, or its first 30
    characters are, or (a reference longer than 8 characters) ``difflib``'s similarity ratio is >= 0.6."""
    from difflib import SequenceMatcher

    scores = []
    for c, a in zip(completions, answer, strict=True):
        gt, pr = _loose_normalize(a), _loose_normalize(c)
        ok = bool(gt) and (gt in pr or gt[:30] in pr or (len(gt) > 8 and SequenceMatcher(None, gt, pr).ratio() >= 0.6))
        scores.append(float(ok))
    return scores


_LAST_NUMBER = re.compile(r"-?\d+\.?\d*")


def _last_number(text: str) -> float | None:
    found = _LAST_NUMBER.findall(strip_think(text).replace(",", ""))
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


def last_number_match(completions: list[str], answer: list[str], **_) -> list[float]:
    """MLLM-CTBench's numeric scoring (math, NumGLUE): the last number of the completion and of the reference
    (``<think>`` spans removed, thousands commas dropped) agree within 1e-3."""
    scores = []
    for c, a in zip(completions, answer, strict=True):
        g, p = _last_number(a), _last_number(c)
        scores.append(float(g is not None and p is not None and abs(g - p) < 1e-3))
    return scores


def label_match(completions: list[str], answer: list[str], labels: tuple[str, ...], **_) -> list[float]:
    """Classification by label words (MLLM-CTBench's FOMC: hawkish/dovish/neutral): the label of the
    reference and of the completion is the first label word in its text after removing ``<think>`` spans;
    right when they are the same label, case-insensitive. (The benchmark's code takes the reference's label
    from the whole solution, in set order when it names several; here its final answer decides.)"""
    labels = tuple(x.lower() for x in labels)

    def first(text: str) -> str | None:
        hits = [(text.find(x), x) for x in labels if x in text]
        return min(hits)[1] if hits else None

    scores = []
    for c, a in zip(completions, answer, strict=True):
        gold = first(strip_think(a).lower())
        scores.append(float(gold is not None and first(strip_think(c).lower()) == gold))
    return scores


_TEXT_METRICS = {"rouge_l": rouge_l, "sari": sari, "edit_sim": edit_similarity, "math": math_equivalent,
                 "choice": choice_match, "vqa": vqa_accuracy, "loose_text": loose_text_match,
                 "last_number": last_number_match}


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


def make_verifier(kind: str = "exact", pattern: str | None = None, function: str | None = None,
                  labels: list[str] | None = None) -> Callable:
    """Build a verifier by name: ``exact``, ``numeric``, ``regex`` (needs ``pattern``), ``function``,
    ``rouge_l``, ``sari``, ``edit_sim``, ``math``, ``choice``, ``vqa``, ``loose_text``, ``last_number``,
    ``label`` (needs ``labels``)."""
    if kind == "label":
        if not labels or isinstance(labels, str) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"verifier 'label' needs 'labels': a list of label words, got {labels!r}")
        return partial(label_match, labels=tuple(labels))
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
