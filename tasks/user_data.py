"""Tasks from user data: local JSONL / CSV / Parquet files, or a hub dataset name when online; both are read
with ``datasets.load_dataset`` (``json``/``csv``/``parquet`` builders for local files).

A user task is described by a mapping in the stream config::

    - name: my_qa
      train: data/qa_train.jsonl        # .jsonl/.json, .csv, .parquet, or hub:<dataset name>
      eval: data/qa_eval.jsonl          # optional; otherwise ``eval_fraction`` of train is held out
      prompt_column: question
      answer_column: answer
      verifier: exact                   # exact | numeric | regex | function | rouge_l | sari | edit_sim | math
                                        # | choice | vqa | loose_text | last_number | label (tasks.verifiers)
      pattern: null                     # for regex
      function: null                    # for function: "package.module:function"
      labels: null                      # for label: the label words, e.g. [hawkish, dovish, neutral]
      final_pattern: null               # regex whose group 1 is the final answer inside the reference answer
                                        # (e.g. GSM8K's "#### 72"), or "boxed" (the last \boxed{...}, braces
                                        # balanced: MATH solutions): SFT trains on the whole answer, the
                                        # verifier and evaluation compare against the extracted final answer
      prompt_template: null             # e.g. "{prompt}\nPut your final answer within \boxed{}.": the
                                        # row's prompt replaces "{prompt}", its options "{choices}", any
                                        # other column "{column}"; a line whose placeholder is empty is left
                                        # out; other braces are literal
      choices_column: null              # multiple choice: the column with the options (a list); they are
                                        # listed as "A. ..." lines ("{choices}", else after the prompt) and
                                        # the answer (an index, a letter or the option's text) becomes its
                                        # letter (verifier: choice)
      answers_column: null              # several references per row (VQA's 10 human answers): kept as the
                                        # row's `answers` (verifier: vqa); SFT trains on the most frequent
      train_split: train                # hub split names
      eval_split: test
      image_column: null                # image-question-answer data (a vision-language model): the column
                                        # holding each row's image(s): a file path (relative to the data
                                        # file), a hub Image feature (decoded PIL or {bytes, path}), or a list
      image_dir: null                   # the folder relative image paths start from (default: the file's)
      missing_image: error              # a row without an image: error | drop | keep (a text-only question)

``train``/``eval`` may name a hub dataset as ``hub:NAME`` or ``hub:NAME@CONFIG`` (e.g. ``hub:openai/gsm8k@main``).

Files are checked before any training: a missing, empty, non-UTF-8 or malformed file, a missing column
or a non-string value fails with one line naming the file, row and column.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any

from tasks.base import Task
from tasks.verifiers import exact_match, make_verifier

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A user data file cannot be used; the message names the file and the problem."""


BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _undecoded(ds, column: str | None):
    """``ds`` with its image column (an ``Image`` feature or a list of them) left as ``{bytes, path}``: rows
    are read without holding every decoded image in memory; each image is decoded once, when it is stored."""
    import datasets

    feature = ds.features.get(column) if column else None
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None) if feature is not None else None
    if isinstance(feature, list) and feature and isinstance(feature[0], datasets.Image):
        return ds.cast_column(column, [datasets.Image(decode=False)])
    if isinstance(inner, datasets.Image):
        return ds.cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
    return ds


def _read_rows(path: Path, text_columns: tuple[str, ...] = (), image_column: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local file through ``datasets.load_dataset`` (the loader hub data goes through too), after
    checks that make its failures one line: the file exists, has a known type, is UTF-8 and not empty."""
    import datasets

    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'; allowed: {', '.join(SUFFIXES)}")
    if suffix != ".parquet":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            raise DataError(f"{path}: file is empty")
    kwargs = {}
    if suffix == ".csv":  # CSV cells are text: every column (named by the header) a string, empty cells ""
        header = next(csv.reader(text.splitlines()[:1]), [])
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False}
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a user file is small: no "Generating train split" bar per task
    try:
        ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
        # prompt and answer are text: a JSON column of numbers would otherwise be typed by its values
        # (2 and 2.5 in one column become 2.0 and 2.5); read float columns again as strings (integers are
        # exact, and an integer answer may be a multiple-choice index)
        recast = {c: datasets.Value("string") for c in text_columns if c in ds.column_names
                  and isinstance(ds.features[c], datasets.Value) and ds.features[c].dtype.startswith("float")}
        if recast and suffix != ".csv":
            ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train",
                                       features=datasets.Features({**ds.features, **recast}))
    except Exception as e:  # the builders raise several types (arrow, pandas, datasets' own)
        raise DataError(f"{path}: {_why_unreadable(path, suffix, e)}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return _undecoded(ds, image_column).to_list()


def _why_unreadable(path: Path, suffix: str, error: Exception) -> str:
    """One line on why ``datasets`` could not read ``path``: for JSON the first line that does not parse or
    holds no object, otherwise the loader's own first line."""
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                return f"invalid JSON at line {e.lineno}: {e.msg}"
            bad = next((i for i, r in enumerate(rows, start=1) if not isinstance(r, dict)), None)
            return f"row {bad} is not an object with columns" if bad else "not a readable JSON file"
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {i} is not valid JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"row {i} is not an object with columns"
    kind = {".csv": "CSV", ".parquet": "Parquet"}.get(suffix, "JSON")
    cause = (str(error).strip().splitlines() or [""])[0][:160]
    return f"not a readable {kind} file ({type(error).__name__}: {cause})"


def _check_rows(rows: list, where: str, prompt_column: str, answer_column: str) -> list[dict]:
    if not rows:
        raise DataError(f"{where}: no rows")
    out = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i} is not an object with columns")
        for col in (prompt_column, answer_column):
            if col not in row or row[col] is None:  # a column other rows have comes back as None
                raise DataError(
                    f"{where}: row {i} has no column '{col}' (columns: {', '.join(map(str, row))})"
                )
            value = row[col]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{where}: row {i} column '{col}' must be a string, got {type(value).__name__}")
            if col == prompt_column and not value:
                raise DataError(f"{where}: row {i} column '{col}' is empty")
        extra = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        raw = row[answer_column]
        if isinstance(raw, int) and not isinstance(raw, bool):  # an integer answer (a multiple-choice index)
            extra["answer_index"] = raw
        out.append({**extra, "prompt": str(row[prompt_column]), "answer": str(raw), "row_source": f"{where}: row {i}"})
    return out


def load_rows(source: str, prompt_column: str, answer_column: str, split: str = "train",
              answers_column: str | None = None, image_column: str | None = None) -> list[dict]:
    """Read and check rows from a local file or ``hub:<name>``; returns rows with prompt/answer columns (with
    ``answers_column``: the answer is the most frequent of the row's references, ties to the first)."""
    if source.startswith("hub:"):
        import datasets

        name, _, config = source[4:].partition("@")
        try:
            rows = _undecoded(datasets.load_dataset(name, config or None, split=split), image_column).to_list()
        except Exception as e:  # offline, missing, gated...
            raise DataError(f"{source}: cannot load hub dataset ({type(e).__name__}: {e})") from None
    else:
        rows = _read_rows(Path(source), (prompt_column, answer_column), image_column)
    if answers_column is not None:
        rows = [_with_majority_answer(r, i, source, answers_column, answer_column) for i, r in enumerate(rows, 1)]
    return _check_rows(rows, source, prompt_column, answer_column)


def _with_majority_answer(row, i: int, where: str, column: str, answer_column: str) -> dict:
    refs = row.get(column) if isinstance(row, dict) else None
    if not isinstance(refs, (list, tuple)) or not refs or not all(isinstance(a, str) for a in refs):
        raise DataError(f"{where}: row {i} column '{column}' must be a non-empty list of answer strings, got {refs!r}")
    from tasks.verifiers import vqa_normalize

    refs = list(refs)
    norm = [vqa_normalize(a) for a in refs]  # the most frequent answer as the VQA metric compares them
    best = refs[max(range(len(refs)), key=lambda k: (norm.count(norm[k]), -k))]
    return {**row, "answers": refs, answer_column: best}


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _as_choice(row: dict, column: str, where: str) -> None:
    """List a multiple-choice row's options as ``A. ...`` lines (``row["choices"]``) and make its answer the
    option's letter: the answer may be an index, a letter or the option's text."""
    options = row.pop(column, None)
    if not isinstance(options, (list, tuple)) or not options or len(options) > len(LETTERS) \
            or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: column '{column}' must be a list of 1-26 option strings, got {options!r}")
    answer, index = row["answer"].strip(), row.pop("answer_index", None)
    if index is not None and 0 <= index < len(options):  # an integer column: the option's index
        letter = LETTERS[index]
    elif answer in options:  # the option's text (also when the options are numbers)
        letter = LETTERS[options.index(answer)]
    elif len(answer) == 1 and answer.upper() in LETTERS[:len(options)]:
        letter = answer.upper()
    elif answer.isdigit() and int(answer) < len(options):
        letter = LETTERS[int(answer)]
    else:
        raise DataError(f"{where}: answer {answer!r} is neither an option's index, letter nor text "
                        f"({len(options)} options)")
    row["choices"] = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
    row["answer"] = letter


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, row: dict) -> str:
    """``template`` with ``{column}`` placeholders (``{prompt}``, ``{choices}``, any string column of ``row``)
    filled in; a line whose placeholders are all empty is left out; other braces stay as written."""
    row = {k: ("" if v is None else v) for k, v in row.items()}  # a null cell is an empty one
    lines = []
    for line in template.split("\n"):
        names = [n for n in _PLACEHOLDER.findall(line) if isinstance(row.get(n), str)]
        if names and not any(row[n].strip() for n in names):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: row[m.group(1)] if isinstance(row.get(m.group(1)), str)
                                      else m.group(0), line))
    return "\n".join(lines)


def load_user_task(
    name: str,
    train: str,
    eval: str | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    verifier: str = "exact",
    pattern: str | None = None,
    function: str | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    final_pattern: str | None = None,
    prompt_template: str | None = None,
    image_column: str | None = None,
    labels: list[str] | None = None,
    choices_column: str | None = None,
    answers_column: str | None = None,
    image_dir: str | None = None,
    missing_image: str = "error",
    train_split: str = "train",
    eval_split: str = "test",
) -> Task:
    """Build a :class:`Task` from user data; eval rows are removed from train by prompt. With ``image_column``
    each row's image(s) lead its prompt as ``<image:REF>`` tags (``cl.vision``): files by path, in-memory
    images written to the image store."""
    try:
        score = make_verifier(verifier, pattern=pattern, function=function,
                              labels=list(labels) if labels is not None else None)
        final_rx = BOXED if final_pattern == "boxed" else re.compile(final_pattern) if final_pattern else None
    except (ValueError, re.error) as e:
        raise DataError(f"task '{name}': {e}") from None
    if prompt_template is not None and "{prompt}" not in prompt_template:
        raise DataError(f"task '{name}': prompt_template must contain '{{prompt}}', got {prompt_template!r}")
    if missing_image not in ("error", "drop", "keep"):
        raise DataError(f"task '{name}': missing_image must be error, drop or keep, got {missing_image!r}")
    train_rows = load_rows(train, prompt_column, answer_column, train_split, answers_column, image_column)
    if eval is not None:
        eval_rows = load_rows(eval, prompt_column, answer_column, eval_split, answers_column, image_column)
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"task '{name}': eval_fraction must be in (0, 1), got {eval_fraction}")
        rows = list(train_rows)
        random.Random(f"{seed}/{name}/split").shuffle(rows)
        n_eval = max(1, int(len(rows) * eval_fraction))
        eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    if image_column is not None and missing_image == "drop":
        train_rows, eval_rows = ([r for r in rows if r.get(image_column) not in (None, [], "")]
                                 for rows in (train_rows, eval_rows))
        if not train_rows or not eval_rows:
            raise DataError(f"task '{name}': no rows with an image in column '{image_column}'")
    if choices_column is not None:
        for r in (*train_rows, *eval_rows):
            _as_choice(r, choices_column, r["row_source"])
    if choices_column is not None and prompt_template is not None and "{choices}" not in prompt_template:
        prompt_template = prompt_template.replace("{prompt}", "{prompt}\n{choices}")  # options after the prompt
    for r in (*train_rows, *eval_rows):
        if prompt_template is not None:
            r["prompt"] = fill_template(prompt_template, r)
        elif choices_column is not None:
            r["prompt"] = f"{r['prompt']}\n{r['choices']}"
    if image_column is not None:
        for source, rows in ((train, train_rows), (eval or train, eval_rows)):
            for r in rows:
                if missing_image == "keep" and r.get(image_column) in (None, [], ""):
                    r.pop(image_column, None)
                    r["prompt"] = r["prompt"].replace("<image>", "")  # a text-only question: no image places
                    continue
                where = r.get("row_source", source)
                r["prompt"] = _place_images(r["prompt"], _image_tags(r, image_column, source, image_dir), where)
    held_out = {r["prompt"] for r in eval_rows}
    train_rows = [r for r in train_rows if r["prompt"] not in held_out]
    if not train_rows:
        raise DataError(f"task '{name}': no training rows left after removing eval prompts")
    if final_rx is not None:
        for where, rows in (("train", train_rows), ("eval", eval_rows)):
            _add_final(rows, final_rx, f"task '{name}' ({where})")
        score = _against_final(score)
    return Task.from_rows(name, train_rows, eval_rows, score, exact_match=score is exact_match, family="user",
                          source=train if eval is None else f"{train} / {eval}")


def _place_images(prompt: str, tags: list[str], where: str) -> str:
    """The prompt with its images: a prompt that marks each image's place with ``<image>`` (LLaVA-style
    data, Geometry3K) gets the tags there, in order; any other prompt is led by them."""
    marks = prompt.count("<image>")
    if marks and marks != len(tags):
        raise DataError(f"{where}: the prompt marks {marks} image place(s) with <image> but the row has "
                        f"{len(tags)} image(s)")
    if marks:
        for tag in tags:
            prompt = prompt.replace("<image>", tag, 1)
        return prompt
    return "".join(tags) + prompt


def _image_tags(row: dict, column: str, source: str, image_dir: str | None = None) -> list[str]:
    """The ``<image:REF>`` tags of a row's image column (removed from the row): paths are resolved against the
    data file's folder and must exist; decoded images and ``{bytes}`` dicts go to the image store."""
    from cl.vision import store_image

    where = row.get("row_source", source)
    value = row.pop(column, None)
    if value is None or value == [] or value == "":
        raise DataError(f"{where} has no image in column '{column}' (missing_image: drop or keep to allow that)")
    tags = []
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, dict) and v.get("bytes"):
            import io

            from PIL import Image

            try:
                v = Image.open(io.BytesIO(v["bytes"]))
            except OSError as e:
                raise DataError(f"{where}: column '{column}' holds bytes that are no image ({e})") from None
        elif isinstance(v, dict):
            v = v.get("path")
        if isinstance(v, str):
            base = Path(image_dir) if image_dir else Path(source).parent if not source.startswith("hub:") else Path(".")
            path = (base / v).expanduser() if not Path(v).is_absolute() else Path(v)
            if not path.is_file():
                raise DataError(f"{where}: image file '{v}' (column '{column}') does not exist at {path}")
            if "<" in str(path) or ">" in str(path):
                raise DataError(f"{where}: image path {path} contains '<' or '>', which end an image tag; rename it")
            tags.append(f"<image:{path.resolve()}>")
        elif hasattr(v, "save"):
            tags.append(store_image(v.convert("RGB")))
        else:
            raise DataError(f"{where}: column '{column}' must hold an image path, an image or a list of them, "
                            f"got {type(v).__name__}")
    return tags


def check_encodable(task: Task, fmt, max_positions: int | None) -> None:
    """Refuse user rows the model cannot read as written: characters its tokenizer maps to the unknown
    token (scored as matches when both sides become ``<unk>``), or prompt + answer (+ eos) longer than the
    model's positions. One line naming the file, the row and the problem; synthetic tasks are skipped."""
    if task.family != "user":
        return
    tok = fmt.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    for split in (task.train, task.eval):
        prompts, answers = list(split["prompt"]), list(split["answer"])
        rows = list(split["row_source"]) if "row_source" in split.column_names else \
            [f"task '{task.name}': row {i}" for i in range(1, len(prompts) + 1)]
        for k, (p, a) in enumerate(fmt.encode(prompts, answers)):
            where = rows[k]
            if unk is not None and (unk in p or unk in a):
                text = prompts[k] + answers[k]
                bad = sorted({c for c in text if unk in tok.encode(c, add_special_tokens=False)})
                raise DataError(f"{where}: the model's tokenizer cannot represent {''.join(bad)!r} (it would become "
                                f"{tok.unk_token!r}); remove or map these characters")
            if max_positions is not None and len(p) + len(a) > max_positions:
                raise DataError(f"{where}: prompt + answer is {len(p) + len(a)} tokens; the model reads at most "
                                f"{max_positions} (model.max_position_embeddings)")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces balanced; None
    without one (MATH's reference solutions mark their final answer this way)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


BOXED = "boxed"  # final_pattern: the last \boxed{...}


def _add_final(rows: list[dict], rx: "re.Pattern | str", where: str) -> None:
    """``row["final"]`` = group 1 (else the match) of ``rx`` in the reference answer, thousands commas removed
    (``rx`` = :data:`BOXED`: the last ``\\boxed{}``'s content, as written)."""
    for i, r in enumerate(rows, start=1):
        if rx == BOXED:
            final = last_boxed(r["answer"])
            if final is None:
                raise DataError(f"{where}: row {i}: no \\boxed{{...}} in the answer {r['answer'][-60:]!r}")
            r["final"] = final.strip()
            continue
        m = rx.search(r["answer"])
        if m is None:
            raise DataError(f"{where}: row {i}: final_pattern {rx.pattern!r} does not match the answer {r['answer'][-60:]!r}")
        r["final"] = (m.group(1) if rx.groups else m.group(0)).strip().replace(",", "")


def _against_final(score):
    """The verifier applied to the extracted final answers instead of the whole reference answers."""

    def verify(completions, final, **columns):
        columns.pop("answer", None)
        return score(completions, answer=final, **columns)

    return verify
