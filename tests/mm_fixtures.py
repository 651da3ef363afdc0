"""Local copies of the multimodal benchmarks' data in their schemas, a few rows each with tiny images drawn
for the test: ``stream=rft_cpt`` (hub Parquet layouts with ``datasets.Image`` features, and the JSONL
layouts with image paths) and ``stream=ctbench`` (MLLM-CTBench's release: JSON lists of
``{problem, solution, image}`` with images under ``images/``)."""

from __future__ import annotations

import json
from pathlib import Path

TEXTVQA_ANSWERS = ["stop", "stop", "stop sign", "stop", "a stop", "stop", "Stop.", "stop", "stop sign", "stop"]


def _image(k: int):
    from PIL import Image

    return Image.new("RGB", (8, 8), ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256))


def _parquet(path: Path, rows: list[dict], features: dict) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(str(path))


def _jsonl_with_images(folder: Path, split: str, rows: list[dict], offset: int) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w") as f:
        for k, r in enumerate(rows):
            name = f"images/{split}{k}.png"
            _image(offset + k).save(folder / name)
            f.write(json.dumps({**r, "image": name}) + "\n")


def write_rft_cpt(root: Path) -> Path:
    """``root`` laid out as ``stream=rft_cpt`` reads it with ``stream.data_dir=root``."""
    from datasets import Image, Sequence, Value

    s = Value("string")
    for split, n, off in (("train", 4, 0), ("test", 3, 100)):
        sqa = [{"image": _image(off + k) if k != 2 else None, "question": f"Which is a {split} thing {k}?",
                "choices": ["rock", "tree", "cloud"][: 2 + k % 2], "answer": k % 2,
                "hint": "" if k % 2 else f"Look at picture {k}."} for k in range(n)]
        _parquet(root / "scienceqa" / f"{split}.parquet", sqa,
                 {"image": Image(), "question": s, "choices": Sequence(s), "answer": Value("int64"), "hint": s})
        vqa = [{"image": _image(off + 10 + k), "question": f"What does sign {split} {k} say?",
                "answers": TEXTVQA_ANSWERS, "question_id": k} for k in range(n)]
        for name in ("textvqa", "vizwiz"):
            _parquet(root / name / f"{split}.parquet", vqa,
                     {"image": Image(), "question": s, "answers": Sequence(s), "question_id": Value("int64")})
        geo = [{"images": [_image(off + 20 + k)], "problem": f"<image>Find x in figure {split} {k}.",
                "answer": str(3 + k)} for k in range(n)]
        _parquet(root / "geometry" / f"{split}.parquet", geo, {"images": Sequence(Image()), "problem": s, "answer": s})
        path = [{"image": _image(off + 30 + k), "question": f"Is tissue {split} {k} normal?",
                 "answer": "yes" if k % 2 else "no"} for k in range(n)]
        _parquet(root / "pathvqa" / f"{split}.parquet", path, {"image": Image(), "question": s, "answer": s})
        _jsonl_with_images(root / "gqa", split, [{"question": f"What colour is object {split} {k}?",
                                                  "answer": "red"} for k in range(n)], off + 40)
        _jsonl_with_images(root / "clevr", split, [{"question": f"How many cubes in scene {split} {k}?",
                                                    "answer": str(k + 1)} for k in range(n)], off + 50)
    return root


CTBENCH = ("art", "OCR", "fomc", "science", "numglue", "math", "medical")
TEXT_ONLY = ("fomc", "numglue")


def ctbench_solution(task: str, k: int) -> str:
    final = {"fomc": ["hawkish", "dovish", "neutral"][k % 3], "numglue": str(10 + k), "math": f"{k}.5"}.get(
        task, f"the {task} answer {k}")
    return f"<think>Reasoning about item {k}; neutral words aside.</think> {final}"


def write_ctbench(root: Path) -> Path:
    """``root`` laid out as MLLM-CTBench's release (``stream=ctbench`` with ``stream.data_dir=root``)."""
    for folder, split, n, off in (("reasoning_train", "train", 4, 0), ("reasoning_test", "test", 3, 100)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for t, task in enumerate(CTBENCH):
            rows = []
            for k in range(n):
                row = {"problem": f"{task} question {split} {k}: answer briefly.", "solution": ctbench_solution(task, k)}
                if task not in TEXT_ONLY:
                    rel = f"{task}_vqa/{split}/{k}.png"
                    (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                    _image(off + 10 * t + k).save(root / "images" / rel)
                    row["image"] = rel
                rows.append(row)
            (root / folder / f"{task}.json").write_text(json.dumps(rows, indent=1))
    return root
