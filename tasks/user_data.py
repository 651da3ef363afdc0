"""Tasks from user data: local JSONL / CSV / Parquet files, or a hub dataset name when online; both are read
with ``datasets.load_dataset`` (``json``/``csv``/``parquet`` builders for local files).

A user task is described by a mapping in the stream config::

    - name: my_qa
      train: data/qa_train.jsonl        # .jsonl/.json, .csv, .parquet, or hub:<dataset name>
      eval: data/qa_eval.jsonl          # optional; otherwise ``eval_fraction`` of train is held out
      prompt_column: question
      answer_column: answer
      verifier: exact                   # exact | numeric | regex | function | rouge_l | sari | edit_sim | math
      pattern: null                     # for regex
      function: null                    # for function: "package.module:function"
      final_pattern: null               # regex whose group 1 is the final answer inside the reference answer
                                        # (e.g. GSM8K's "#### 72"), or "boxed" (the last \boxed{...}, braces
                                        # balanced: MATH solutions): SFT trains on the whole answer, the
                                        # verifier and evaluation compare against the extracted final answer
      prompt_template: null             # e.g. "{prompt}\nPut your final answer within \boxed{}.": the
                                        # row's prompt replaces "{prompt}" (other braces are literal)
      image_column: null                # image-question-answer data (a vision-language model): the column
                                        # holding each row's image(s): a file path (relative to the data
                                        # file), a hub Image feature (decoded PIL or {bytes, path}), or a list

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


def _read_rows(path: Path, text_columns: tuple[str, ...] = ()) -> list[dict[str, Any]]:
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
        # (2 and 2.5 in one column become 2.0 and 2.5); read those columns again as strings
        recast = {c: datasets.Value("string") for c in text_columns if c in ds.column_names
                  and isinstance(ds.features[c], datasets.Value) and ds.features[c].dtype.startswith(("int", "uint", "float"))}
        if recast and suffix != ".csv":
            ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train",
                                       features=datasets.Features({**ds.features, **recast}))
    except Exception as e:  # the builders raise several types (arrow, pandas, datasets' own)
        raise DataError(f"{path}: {_why_unreadable(path, suffix, e)}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return ds.to_list()


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
            if isinstance(value, (int, float)) and not isinstance(value, bool) and col == answer_column:
                value = str(value)
            if not isinstance(value, str):
                raise DataError(f"{where}: row {i} column '{col}' must be a string, got {type(value).__name__}")
            if col == prompt_column and not value:
                raise DataError(f"{where}: row {i} column '{col}' is empty")
        extra = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        out.append({**extra, "prompt": row[prompt_column], "answer": str(row[answer_column]), "row_source": f"{where}: row {i}"})
    return out


def load_rows(source: str, prompt_column: str, answer_column: str, split: str = "train") -> list[dict]:
    """Read and check rows from a local file or ``hub:<name>``; returns rows with prompt/answer columns."""
    if source.startswith("hub:"):
        import datasets

        name, _, config = source[4:].partition("@")
        try:
            rows = datasets.load_dataset(name, config or None, split=split).to_list()
        except Exception as e:  # offline, missing, gated...
            raise DataError(f"{source}: cannot load hub dataset ({type(e).__name__}: {e})") from None
    else:
        rows = _read_rows(Path(source), (prompt_column, answer_column))
    return _check_rows(rows, source, prompt_column, answer_column)


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
) -> Task:
    """Build a :class:`Task` from user data; eval rows are removed from train by prompt. With ``image_column``
    each row's image(s) lead its prompt as ``<image:REF>`` tags (``cl.vision``): files by path, in-memory
    images written to the image store."""
    try:
        score = make_verifier(verifier, pattern=pattern, function=function)
        final_rx = BOXED if final_pattern == "boxed" else re.compile(final_pattern) if final_pattern else None
    except (ValueError, re.error) as e:
        raise DataError(f"task '{name}': {e}") from None
    if prompt_template is not None and "{prompt}" not in prompt_template:
        raise DataError(f"task '{name}': prompt_template must contain '{{prompt}}', got {prompt_template!r}")
    train_rows = load_rows(train, prompt_column, answer_column, "train")
    if eval is not None:
        eval_rows = load_rows(eval, prompt_column, answer_column, "test")
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"task '{name}': eval_fraction must be in (0, 1), got {eval_fraction}")
        rows = list(train_rows)
        random.Random(f"{seed}/{name}/split").shuffle(rows)
        n_eval = max(1, int(len(rows) * eval_fraction))
        eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    if prompt_template is not None:
        for r in (*train_rows, *eval_rows):
            r["prompt"] = prompt_template.replace("{prompt}", r["prompt"])
    if image_column is not None:
        for source, rows in ((train, train_rows), (eval or train, eval_rows)):
            for r in rows:
                r["prompt"] = _image_tags(r, image_column, source) + r["prompt"]
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


def _image_tags(row: dict, column: str, source: str) -> str:
    """The ``<image:REF>`` tags of a row's image column (removed from the row): paths are resolved against the
    data file's folder and must exist; decoded images and ``{bytes}`` dicts go to the image store."""
    from cl.vision import store_image

    where = row.get("row_source", source)
    value = row.pop(column, None)
    if value is None:
        raise DataError(f"{where} has no image in column '{column}'")
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
            base = Path(source).parent if not source.startswith("hub:") else Path(".")
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
    return "".join(tags)


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
