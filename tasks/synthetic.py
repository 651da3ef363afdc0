"""Synthetic task families for the embedded toy world (arithmetic and string skills).

Every family is a seeded generator of ``(body, answer)`` pairs. A prompt is ``"<TAG>:<body>="`` (the tag
tells the model which skill is asked) and the answer is a fixed-width
string, so exact match is the natural verifier. The eval split is drawn first from its own seeded
stream of unique prompts; training rows are drawn from another stream and never repeat an eval prompt.

Worked-steps (scratchpad) variants exist for the add, sub and mul families, for the "with vs without
reasoning" ablation: the prompt tag gains a ``w`` (``A3w:378+456=``), the target is the column-by-column
working, a ``|`` and the final answer (``8+6+0=14,7+5+1=13,3+4+1=08|0834``), and a variant draws exactly
the same problems as its plain task (same seeded streams), so the two formats are compared on the same
eval prompts. Accuracy is the final answer's exact match; the RL reward adds a format term
(``tasks.verifiers.worked_reward``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

from tasks.base import Task
from tasks.verifiers import exact_match, worked_answer_match, worked_reward

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


def add_steps(body: str) -> str:
    """Column sums right to left with the incoming carry, each as two digits: ``78+56`` ->
    ``8+6+0=14,7+5+1=13``; the final answer is the last sum followed by the other sums' low digits."""
    a, b = body.split("+")
    steps, carry = [], 0
    for x, y in zip(reversed(a), reversed(b)):
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return ",".join(steps)


def sub_steps(body: str) -> str:
    """Column differences right to left with borrowing, written ``1x-y-b=r`` when a column borrows:
    ``52-37`` -> ``12-7-0=5,5-3-1=1``."""
    a, b = body.split("-")
    steps, borrow = [], 0
    for x, y in zip(reversed(a), reversed(b)):
        top = int(x)
        nxt = 1 if top - int(y) - borrow < 0 else 0
        steps.append(f"{'1' if nxt else ''}{x}-{y}-{borrow}={top + 10 * nxt - int(y) - borrow}")
        borrow = nxt
    return ",".join(steps)


def mul_steps(body: str) -> str:
    """Digit products right to left with the carry, each as two digits: ``38*7`` -> ``8*7+0=56,3*7+5=26``."""
    a, d = body.split("*")
    steps, carry = [], 0
    for x in reversed(a):
        s = int(x) * int(d) + carry
        steps.append(f"{x}*{d}+{carry}={s:02d}")
        carry = s // 10
    return ",".join(steps)


@dataclass(frozen=True)
class SyntheticFamily:
    """A named generator: ``tag`` goes into the prompt, ``sample`` draws one (body, answer).

    With ``worked`` set, the family is the worked-steps variant: rows carry ``final`` (the answer) and
    ``answer = worked(body) + "|" + final`` (the SFT target); ``draws_as`` names the plain task whose
    seeded streams it reuses, so both formats see the same problems.
    """

    family: str
    tag: str
    sample: Sampler = field(repr=False)
    worked: Callable[[str], str] | None = field(default=None, repr=False)
    draws_as: str | None = None

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
            body, answer, *key = self.sample(rng)  # a sampler may add the row's cover key (0-9)
            p = self.prompt(body)
            if p in seen:
                continue
            if unique:
                seen.add(p)
            if self.worked is None:
                rows.append({"prompt": p, "answer": answer, **({"key": key[0]} if key else {})})
            else:
                rows.append({"prompt": p, "answer": f"{self.worked(body)}|{answer}", "final": answer})
        return rows

    def build(self, name: str, n_train: int, n_eval: int, seed: int) -> Task:
        """Deterministic train/eval splits from ``seed``; eval prompts never appear in train."""
        stream = self.draws_as or name
        eval_rows = self.rows(n_eval, random.Random(f"{seed}/{stream}/eval"), set(), unique=True)
        eval_prompts = {r["prompt"] for r in eval_rows}
        train_rows = self.rows(n_train, random.Random(f"{seed}/{stream}/train"), eval_prompts, unique=False)
        if self.worked is None:
            return Task.from_rows(name, train_rows, eval_rows, exact_match, exact_match=True, family=self.family)
        return Task.from_rows(name, train_rows, eval_rows, worked_answer_match, exact_match=False,
                              family=self.family, reward=worked_reward)
