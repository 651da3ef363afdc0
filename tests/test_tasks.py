import json
import re

import pytest

from tasks.registry import TASK_NAMES, build_task
from tasks.stream import build_tasks, joint_task
from tasks.user_data import DataError, load_user_task
from tasks.synthetic import add_steps, mul_steps, sub_steps
from tasks.visual import VISUAL_FAMILIES
from tasks.verifiers import (exact_match, make_verifier, numeric_match, regex_match, worked_answer_match,
                             worked_format, worked_reward)


def _solve(name: str, prompt: str) -> str:
    body = prompt.split(":", 1)[1][:-1]
    if name.startswith("add"):
        a, b = body.split("+")
        return f"{int(a) + int(b):0{len(a) + 1}d}"
    if name.startswith("sub"):
        a, b = body.split("-")
        return f"{int(a) - int(b):0{len(a)}d}"
    if name == "mul21":
        a, d = body.split("*")
        return f"{int(a) * int(d):03d}"
    if name == "mod3":
        a, m = body.split("%")
        return str(int(a) % int(m))
    if name == "rotate6":
        k, w = body.split(",")
        return w[int(k):] + w[: int(k)]
    if name == "count8":
        c, w = body.split(",")
        return str(w.count(c))
    return {"copy6": body, "reverse6": body[::-1], "sort6": "".join(sorted(body)),
            "double4": "".join(c + c for c in body)}[name]


def test_at_least_eight_families():
    families = {build_task(n, 5, 5, 0).family for n in TASK_NAMES}
    assert len(families) >= 8


TEXT_TASKS = [n for n in TASK_NAMES if n not in VISUAL_FAMILIES]  # the visual ones: tests/test_vision.py


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_answers_are_correct_and_splits_disjoint_and_deterministic(name):
    t = build_task(name, n_train=300, n_eval=100, seed=7)
    for row in list(t.train) + list(t.eval):
        if name.endswith("w"):  # worked-steps variant: the final answer after the working
            assert row["final"] == _solve(name[:-1], row["prompt"]) and row["answer"].endswith("|" + row["final"])
        else:
            assert row["answer"] == _solve(name, row["prompt"]), row
    assert not set(list(t.train["prompt"])) & set(list(t.eval["prompt"]))
    assert len(set(list(t.eval["prompt"]))) == 100
    again = build_task(name, n_train=300, n_eval=100, seed=7)
    assert list(again.train["prompt"]) == list(t.train["prompt"]) and list(again.eval["prompt"]) == list(t.eval["prompt"])
    assert build_task(name, 300, 100, seed=8).eval["prompt"] != list(t.eval["prompt"])


def test_unknown_task_lists_allowed_names():
    with pytest.raises(ValueError, match="unknown task 'nope'; allowed: add2"):
        build_task("nope", 1, 1, 0)


def test_verifiers():
    assert exact_match(["12", "12 "], answer=["12", "12"]) == [1.0, 0.0]
    assert numeric_match(["so 42.0", "x", "41"], answer=["42", "42", "42"]) == [1.0, 0.0, 0.0]
    assert regex_match(["ans: 7", "none"], answer=["7", "7"], pattern=r"ans: (\d+)") == [1.0, 0.0]
    f = make_verifier("function", function="tasks.verifiers:exact_match")
    assert f(["a"], answer=["a"]) == [1.0]
    with pytest.raises(ValueError, match="allowed"):
        make_verifier("fuzzy")


def test_joint_task_mixes_all_training_rows():
    ts = build_tasks(["add3", "sub2"], n_train=50, n_eval=10, seed=0)
    j = joint_task(ts)
    assert len(j.train) == 100 and set(list(j.train["task"])) == {"add3", "sub2"}


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_user_jsonl_csv_parquet_load(tmp_path):
    rows = [{"q": f"what is {i}+1", "a": str(i + 1)} for i in range(40)]
    j = _write_jsonl(tmp_path / "d.jsonl", rows)
    t = load_user_task("mine", train=j, prompt_column="q", answer_column="a", verifier="numeric")
    assert len(t.train) + len(t.eval) == 40 and not t.exact_match
    assert not set(list(t.train["prompt"])) & set(list(t.eval["prompt"]))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for f in ("d.csv", "d.parquet"):
        t2 = load_user_task("mine", train=str(tmp_path / f), prompt_column="q", answer_column="a")
        assert sorted(list(t2.train["prompt"]) + list(t2.eval["prompt"])) == sorted(r["q"] for r in rows)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "file is empty"),
        (b"   \n", "file is empty"),
        (b"\xff\xfe\x00bad", "not valid UTF-8"),
        (b'{"prompt": "a", "answer": "b"}\n{oops\n', "line 2 is not valid JSON"),
        (b'{"prompt": "a"}\n', "no column 'answer'"),
        (b'{"prompt": ["a"], "answer": "b"}\n', "column 'prompt' must be a string, got list"),
        (b'{"prompt": "", "answer": "b"}\n', "column 'prompt' is empty"),
        (b'[1, 2]\n', "row 1 (is not an object|has no column 'prompt')"),
    ],
)
def test_malformed_user_files_fail_with_one_clear_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        load_user_task("bad", train=str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_user_task("x", train=str(tmp_path / "none.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_user_task("x", train=str(tmp_path / "x.txt"))
    good = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": "a"}] * 3)
    with pytest.raises(DataError, match="verifier 'regex' needs a 'pattern'"):
        load_user_task("x", train=good, verifier="regex")


def _replay_steps(kind: str, steps: str) -> int:
    """Recompute the result from the working alone (each step re-checked), independent of the generator."""
    digits, carry = [], 0
    for step in steps.split(","):
        lhs, rhs = step.split("=")
        if kind == "add":
            x, y, c = (int(v) for v in lhs.split("+"))
            assert c == carry and x + y + c == int(rhs) and len(rhs) == 2
            digits.append(rhs[1]); carry = int(rhs[0])
        elif kind == "sub":
            x, y, b = (int(v) for v in lhs.split("-"))
            assert b == carry and 0 <= x - y - b == int(rhs) <= 9
            digits.append(rhs); carry = int(x >= 10)
        else:
            xd, rest = lhs.split("*")
            d, c = (int(v) for v in rest.split("+"))
            assert c == carry and int(xd) * d + c == int(rhs)
            digits.append(rhs[1]); carry = int(rhs[0])
    return int(str(carry) + "".join(reversed(digits)))


@pytest.mark.parametrize("seed", range(5))
def test_worked_steps_are_valid_arithmetic(seed):
    import random

    rng = random.Random(seed)
    for _ in range(200):
        a, b = rng.randrange(1000), rng.randrange(1000)
        assert _replay_steps("add", add_steps(f"{a:03d}+{b:03d}")) == a + b
        a, b = max(a, b) % 100, min(a, b) % 100
        a, b = max(a, b), min(a, b)
        assert _replay_steps("sub", sub_steps(f"{a:02d}-{b:02d}")) == a - b
        a, d = rng.randrange(100), rng.randrange(10)
        assert _replay_steps("mul", mul_steps(f"{a:02d}*{d}")) == a * d


@pytest.mark.parametrize("plain, worked", [("add3", "add3w"), ("sub2", "sub2w"), ("mul21", "mul21w")])
def test_worked_variant_has_the_same_problems_and_scores_the_final_answer(plain, worked):
    p, w = build_task(plain, 200, 50, 3), build_task(worked, 200, 50, 3)
    assert p.family == w.family and not w.exact_match and w.reward is not None
    for a, b in zip(list(p.eval) + list(p.train), list(w.eval) + list(w.train)):
        assert b["prompt"] == a["prompt"].replace(":", "w:", 1) and b["final"] == a["answer"]
    row = w.eval[0]
    good, wrong_steps, no_steps, bad = row["answer"], "x|" + row["final"], row["final"], row["answer"] + "9"
    cols = {k: [row[k]] * 4 for k in row}
    # accuracy is the final answer only; the working is not graded
    assert w.score([good, wrong_steps, no_steps, bad], **cols) == [1.0, 1.0, 0.0, 0.0]
    assert w.reward_scores([good, wrong_steps, no_steps, bad], **cols) == pytest.approx([1.0, 1.0, 0.0, 0.1])
    assert worked_format(["1|2", "|2", "1|", "1|2|3", "12"]) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert worked_answer_match(["1|2|3"], final=["3"]) == [1.0]
    assert worked_reward(["a|7", "a|8"], final=["7", "7"]) == pytest.approx([1.0, 0.1])


def test_user_verifier_function_that_cannot_be_imported_names_the_task(tmp_path):
    from tasks.user_data import DataError, load_user_task

    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 20)
    with pytest.raises(DataError, match=r"task 'qa': verifier function 'nope.mod:fn' cannot be imported"):
        load_user_task("qa", str(data), verifier="function", function="nope.mod:fn")


def test_final_pattern_trains_on_the_solution_and_verifies_the_final_answer(tmp_path):
    from tasks.user_data import load_user_task

    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Q{i}: 2+{i}?", "answer": f"2 plus {i} is {2 + i}.\n#### {2 + i:,}"} for i in range(1000, 1040)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_user_task("gsm", str(data), prompt_column="question", verifier="numeric",
                          final_pattern=r"####\s*(-?[\d,]*\.?\d+)")
    row = task.train[0]
    assert row["answer"].startswith("2 plus") and row["final"] == row["answer"].split("#### ")[1].replace(",", "")
    assert not task.exact_match  # scored by generation + the verifier, not the teacher-forced shortcut
    cols = {k: [row[k]] for k in row}
    assert task.score([f"so the answer is {row['final']}"], **cols) == [1.0]
    assert task.score(["so the answer is 7"], **cols) == [0.0]


def test_final_pattern_that_does_not_match_names_the_row(tmp_path):
    from tasks.user_data import DataError, load_user_task

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(20)))
    with pytest.raises(DataError, match=r"task 'qa' \(train\): row 1: final_pattern '####' does not match"):
        load_user_task("qa", str(data), final_pattern="####")


def test_hub_source_passes_the_dataset_config(monkeypatch):
    import datasets

    from tasks.user_data import load_rows

    seen = {}

    def fake(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("hub:openai/gsm8k@main", "question", "answer", "test")
    assert seen == {"name": "openai/gsm8k", "config": "main", "split": "test"} and rows[0]["prompt"] == "q"


def test_hub_stream_preset_is_valid_and_fails_offline_with_the_dataset_named(tmp_path):
    from omegaconf import OmegaConf

    from cl.validate import validate_config
    from tests.conftest import compose_cfg

    cfg = compose_cfg("stream=hub_math", "model=qwen2_5_1_5b_instruct", "base=none")
    validate_config(OmegaConf.to_container(cfg, resolve=True))
    assert [t["name"] for t in cfg.stream.tasks] == ["gsm8k", "svamp"]


@pytest.mark.parametrize("verifier, match", [
    (lambda c, **_: [1.0], "returned 1 scores for 3 completions"),
    (lambda c, **_: [float("nan")] * len(c), "returned nan for completion 0"),
    (lambda c, **_: [0.0, 5.0, 1.0], r"returned 5.0 for completion 1; every score must be a finite number in \[0, 1\]"),
    (lambda c, **_: {}["label"], "raised KeyError: 'label'"),
    (lambda c, **_: 1.0, "returned float '1.0'; expected one number per completion"),
])
def test_verifier_contract_is_enforced_with_one_line_naming_the_task(verifier, match):
    from tasks.base import Task, VerifierError

    task = Task("qa", train=None, eval=None, verifier=verifier)
    with pytest.raises(VerifierError, match=r"^task 'qa': verifier .*" + match) as e:
        task.score(["a", "b", "c"], answer=["a", "b", "c"])
    assert "\n" not in str(e.value)
    ok = Task("qa", train=None, eval=None, verifier=lambda c, **_: [1, 0.5, 0], reward=lambda c, **_: [-2.0, 0.0, 3.0])
    assert ok.score(["a", "b", "c"]) == [1.0, 0.5, 0.0] and ok.reward_scores(["a", "b", "c"]) == [-2.0, 0.0, 3.0]


def test_user_rows_the_model_cannot_read_are_refused_naming_file_and_row(tmp_path):
    from cl.core.data import PromptFormat
    from cl.tokenizer import build_char_tokenizer
    from tasks.user_data import check_encodable

    fmt = PromptFormat(build_char_tokenizer())
    rows = [{"prompt": f"q{i}=", "answer": str(i)} for i in range(30)]
    rows[7]["answer"] = "7 °C"  # '°' is not in the character tokenizer's alphabet
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_user_task("mine", train=path)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: row 8: the model's tokenizer cannot represent '°'"):
        check_encodable(task, fmt, 64)
    rows[7]["answer"] = "7"
    rows[3]["prompt"] = "x" * 70
    task = load_user_task("mine", train=_write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"row 4: prompt \+ answer is 73 tokens; the model reads at most 64"):
        check_encodable(task, fmt, 64)
    rows[3]["prompt"] = "x"
    check_encodable(load_user_task("mine", train=_write_jsonl(tmp_path / "d.jsonl", rows)), fmt, 64)


def test_user_answers_keep_their_text_when_a_json_column_mixes_ints_and_floats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    answers = [2, 2.5, 10]
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": answers[i % 3]}) + "\n" for i in range(30)))
    t = load_user_task("mixed", train=str(path))
    assert sorted(set(t.train["answer"]) | set(t.eval["answer"])) == ["10", "2", "2.5"]  # not "2.0", "10.0"
    gap = tmp_path / "gap.jsonl"
    gap.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match="row 2 has no column 'answer'"):
        load_user_task("gap", train=str(gap))
