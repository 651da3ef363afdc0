"""The text-generation verifiers of real benchmarks (ROUGE-L, SARI, edit similarity, math equivalence):
known values from their libraries and papers, and the verifier contract (one score in [0, 1] per row)."""

from __future__ import annotations

import pytest

from tasks.verifiers import (edit_similarity, make_verifier, math_equivalent, rouge_l, sari, sari_sentence)

ASSET_LIKE = dict(  # Hugging Face evaluate's documented SARI example (its metric card): 26.953601953601954
    source="About 95 species are currently accepted .",
    output="About 95 you now get in .",
    references=["About 95 species are currently known .", "About 95 species are now accepted .",
                "95 species are now accepted ."],
)


def test_sari_reproduces_the_maintained_implementations_documented_value():
    assert sari_sentence(**ASSET_LIKE) * 100 == pytest.approx(26.953601953601954, abs=1e-9)


def test_sari_edge_cases_follow_the_definition():
    s = "the cat sat on the mat ."
    assert sari_sentence(s, s, [s]) == pytest.approx(1.0)  # nothing to add or delete, all kept: 0/0 := 1
    # keeping the source when every reference simplifies it: no additions (F1 0), no deletions (P 1)
    copy = sari_sentence("a b c d e", "a b c d e", ["a b", "a b"])
    simplified = sari_sentence("a b c d e", "a b", ["a b", "a b"])
    assert simplified == pytest.approx(1.0) and copy < simplified
    # an added word the references also add is rewarded over one they do not add
    good = sari_sentence("he went home", "he walked home", ["he walked home"])
    bad = sari_sentence("he went home", "he ran home", ["he walked home"])
    assert good > bad


def test_sari_verifier_reads_source_and_reference_columns():
    got = sari(["About 95 you now get in ."], ["unused"], source=[ASSET_LIKE["source"]],
               references=[ASSET_LIKE["references"]])
    assert got == [pytest.approx(0.26953601953601954)]
    # without a references column the answer is the one reference; without a source, the prompt
    one = sari(["he walked home"], ["he walked home"], prompt=["he went home"])
    assert one == [pytest.approx(sari_sentence("he went home", "he walked home", ["he walked home"]))]
    with pytest.raises(ValueError, match="'source'"):
        sari(["x"], ["y"])


def test_rouge_l_and_edit_similarity_on_known_pairs():
    from rapidfuzz.fuzz import ratio
    from rouge_score.rouge_scorer import RougeScorer

    # LCS "the cat sat" = 3 words: precision 1, recall 3/6, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(2 / 3)]
    assert rouge_l(["The Cat, sat!"], ["the cat sat"]) == [pytest.approx(1.0)]  # lowercased words
    pair = ("Budget approved after long debate", "The council approved the budget after debate")
    assert rouge_l([pair[0]], [pair[1]])[0] == pytest.approx(RougeScorer(["rougeL"]).score(pair[1], pair[0])["rougeL"].fmeasure)
    # kitten -> sitting: indel distance 5 over 13 characters
    assert edit_similarity(["kitten"], ["sitting"]) == [pytest.approx(8 / 13)]
    assert edit_similarity(["  return x\n"], ["return x"]) == [1.0]
    assert edit_similarity(["def f(a):"], ["def g(b):"]) == [pytest.approx(ratio("def f(a):", "def g(b):") / 100)]


def test_math_equivalence_accepts_equal_values_in_other_forms():
    completions = [r"so the answer is \boxed{\frac{1}{2}}", "0.5", "The answer is 72.", "x = 3",
                   "72 apples, not 73", "", r"\boxed{(1, 2]}"]
    answers = ["0.5", r"\frac12", "72", "4", "72", "1", r"(1, 2]"]
    assert math_equivalent(completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("kind", ["rouge_l", "sari", "edit_sim", "math"])
def test_text_verifiers_build_by_name_and_keep_the_contract(kind):
    from tasks.base import checked_scores

    fn = make_verifier(kind)
    cols = {"answer": ["12", "the cat sat"], "prompt": ["six plus six", "the cat sat down"]}
    scores = checked_scores("t", fn, ["12", "a dog"], cols)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert scores[0] >= scores[1]
