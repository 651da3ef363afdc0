"""Synthetic task families for the embedded toy world (arithmetic and string skills).

Every family is a seeded generator of ``(body, answer)`` pairs. A prompt is ``"<TAG>:<body>="`` (the tag
tells the model which skill is asked, as in ../shared/TOYWORLD.md) and the answer is a fixed-width
string, so exact match is the natural verifier. The eval split is drawn first from its own seeded
stream of unique prompts; training rows are drawn from another stream and never repeat an eval prompt.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

from tasks.base import Task
from tasks.verifiers import exact_match

Sampler = Callable[[random.Random], tuple[str, str]]
LETTERS = string.ascii_lowercase


def _digits(rng: random.Random, n: int) -> int:
    return rng.randrange(0, 10**n)


def add(digits: int) -> Sampler:
    """``a+b`` with ``digits``-digit operands; answer zero-padded to ``digits + 1``."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = _digits(rng, digits), _digits(rng, digits)
        return f"{a:0{digits}d}+{b:0{digits}d}", f"{a + b:0{digits + 1}d}"

    return sample


def sub(digits: int) -> Sampler:
    """``a-b`` with ``a >= b`` (non-negative result); answer zero-padded to ``digits``."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a, b = _digits(rng, digits), _digits(rng, digits)
        a, b = max(a, b), min(a, b)
        return f"{a:0{digits}d}-{b:0{digits}d}", f"{a - b:0{digits}d}"

    return sample


def mul(digits: int) -> Sampler:
    """``a*d`` with a ``digits``-digit ``a`` and one digit ``d``; answer zero-padded to ``digits + 1``."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a, d = _digits(rng, digits), rng.randrange(0, 10)
        return f"{a:0{digits}d}*{d}", f"{a * d:0{digits + 1}d}"

    return sample


def mod(digits: int) -> Sampler:
    """``a%m`` with a ``digits``-digit ``a`` and ``m`` in 2..9; one-digit answer."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a, m = _digits(rng, digits), rng.randrange(2, 10)
        return f"{a:0{digits}d}%{m}", str(a % m)

    return sample


def _word(rng: random.Random, length: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def string_map(length: int, fn: Callable[[str], str]) -> Sampler:
    """A string skill: the answer is ``fn(word)`` for a random lowercase word of ``length`` letters."""

    def sample(rng: random.Random) -> tuple[str, str]:
        w = _word(rng, length)
        return w, fn(w)

    return sample


def rotate(length: int) -> Sampler:
    """Rotate a word left by ``k`` in 1..length-1; the prompt carries ``k``: ``3,abcdef`` -> ``defabc``."""

    def sample(rng: random.Random) -> tuple[str, str]:
        w, k = _word(rng, length), rng.randrange(1, length)
        return f"{k},{w}", w[k:] + w[:k]

    return sample


def count(length: int, alphabet: str = "abcd") -> Sampler:
    """Count a letter in a word over a small alphabet: ``b,abbcab`` -> ``3``."""

    def sample(rng: random.Random) -> tuple[str, str]:
        w, c = _word(rng, length, alphabet), rng.choice(alphabet)
        return f"{c},{w}", str(w.count(c))

    return sample


@dataclass(frozen=True)
class SyntheticFamily:
    """A named generator: ``tag`` goes into the prompt, ``sample`` draws one (body, answer)."""

    family: str
    tag: str
    sample: Sampler = field(repr=False)

    def prompt(self, body: str) -> str:
        return f"{self.tag}:{body}="

    def rows(self, n: int, rng: random.Random, exclude: set[str], unique: bool) -> list[dict]:
        """Draw ``n`` rows whose prompts are not in ``exclude`` (and pairwise distinct if ``unique``)."""
        rows, seen, tries = [], set(exclude), 0
        while len(rows) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(
                    f"task family '{self.family}' cannot produce {n} rows outside the excluded set; "
                    "lower n_eval/n_train"
                )
            body, answer = self.sample(rng)
            p = self.prompt(body)
            if p in seen:
                continue
            if unique:
                seen.add(p)
            rows.append({"prompt": p, "answer": answer})
        return rows

    def build(self, name: str, n_train: int, n_eval: int, seed: int) -> Task:
        """Deterministic train/eval splits from ``seed``; eval prompts never appear in train."""
        eval_rows = self.rows(n_eval, random.Random(f"{seed}/{name}/eval"), set(), unique=True)
        eval_prompts = {r["prompt"] for r in eval_rows}
        train_rows = self.rows(n_train, random.Random(f"{seed}/{name}/train"), eval_prompts, unique=False)
        return Task.from_rows(name, train_rows, eval_rows, exact_match, exact_match=True, family=self.family)
