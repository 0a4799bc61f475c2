"""A controllable multi-step arithmetic reasoning task generated from a dependency graph of operations.

A problem defines a few variables by single-digit literals and then ``d`` operations (``d`` = the difficulty),
each a new variable computed from two earlier ones with ``+``, ``-`` or ``*`` modulo 10. Every operation uses the
result of the previous one, so the queried (last) variable depends on all ``d`` operations; its other operand is
any earlier variable. Variable letters are drawn at random, so nothing can be memorised by name::

    prompt:   q=3,x=8,k=q*x,b=k+q,?b
    solution: k=3*8=4,b=4+3=7,#7

Worked solutions for supervised training can carry *slips* (:func:`worked_solution` with ``slip_rate > 0``): each
step's result is, with that probability, replaced by a wrong digit and the later steps carry the mistake forward,
as in imperfect human-written data. A policy imitating such data makes the same slips when sampling; the
reward of the RL stage is always the true answer.

Answers are single digits checked exactly after the final-answer marker ``#``. Train and eval problems are kept
apart by a hash of the problem text (eval owns one bucket of the hash space), so the splits cannot overlap
whatever seeds are used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import string
from collections.abc import Iterator

__all__ = ["Problem", "ArithTask", "worked_solution", "extract_answer", "score_completion", "ANSWER_MARKER"]

ANSWER_MARKER = "#"
OPS = ("+", "-", "*")
MODULUS = 10
_EVAL_BUCKETS = 8  # 1/8 of the problem space belongs to the eval split


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str  # the worked solution, ending with the answer marker and the answer
    answer: int
    difficulty: int

    @property
    def model_input(self) -> str:
        """The text a model is prompted with (the problem and a newline); it should continue with the solution."""
        return self.prompt + "\n"

    def as_row(self) -> dict:
        return {"prompt": self.model_input, "answer": str(self.answer), "solution": self.solution,
                "difficulty": self.difficulty}


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return (a + b) % MODULUS
    if op == "-":
        return (a - b) % MODULUS
    return (a * b) % MODULUS


_DEF_RE = re.compile(r"([a-z])=(?:(\d)|([a-z])([-+*])([a-z]))$")


def worked_solution(prompt: str, rng: random.Random | None = None, slip_rate: float = 0.0) -> str:
    """The step-by-step solution of a problem text; with ``slip_rate`` each step's result is wrong with that
    probability (a uniformly drawn other digit), and later steps use the wrong value."""
    if not 0.0 <= slip_rate < 1.0:
        raise ValueError(f"slip_rate must be in [0, 1), got {slip_rate}")
    if slip_rate and rng is None:
        raise ValueError("a slip_rate needs an rng")
    *defs, query = prompt.strip().split(",")
    values: dict[str, int] = {}
    steps = []
    for text in defs:
        m = _DEF_RE.match(text)
        if m is None:
            raise ValueError(f"not a definition: {text!r} in {prompt!r}")
        name, literal, left, op, right = m.groups()
        if literal is not None:
            values[name] = int(literal)
            continue
        value = _apply(op, values[left], values[right])
        if slip_rate and rng.random() < slip_rate:
            value = (value + rng.randrange(1, MODULUS)) % MODULUS
        steps.append(f"{name}={values[left]}{op}{values[right]}={value}")
        values[name] = value
    return ",".join(steps) + f",{ANSWER_MARKER}{values[query.lstrip('?')]}"


def _is_eval(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0] % _EVAL_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class ArithTask:
    """Generator of problems with ``min_ops..max_ops`` operations and ``num_literals`` literal variables."""

    min_ops: int = 1
    max_ops: int = 4
    num_literals: int = 2
    # the operand besides the previous result: any earlier variable (a lookup into earlier steps), or only a
    # literal (a lookup into the prompt; the chain of results is then read off the previous step)
    operands: str = "any"

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops <= 20:
            raise ValueError(f"need 1 <= min_ops <= max_ops <= 20, got {self.min_ops}, {self.max_ops}")
        if not 1 <= self.num_literals <= 5:
            raise ValueError(f"num_literals must be in [1, 5], got {self.num_literals}")
        if self.operands not in ("any", "literal"):
            raise ValueError(f"operands must be 'any' or 'literal', got {self.operands!r}")

    def generate(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        d = rng.randint(self.min_ops, self.max_ops) if difficulty is None else difficulty
        names = rng.sample(string.ascii_lowercase, self.num_literals + d)
        values: dict[str, int] = {}
        defs, steps = [], []
        for name in names[: self.num_literals]:
            values[name] = rng.randrange(MODULUS)
            defs.append(f"{name}={values[name]}")
        prev = names[self.num_literals - 1]
        for name in names[self.num_literals:]:
            pool = names[: self.num_literals] if self.operands == "literal" else list(values)
            other = rng.choice([n for n in pool if n != prev] or [prev])
            left, right = (prev, other) if rng.random() < 0.5 else (other, prev)
            op = rng.choice(OPS)
            values[name] = _apply(op, values[left], values[right])
            defs.append(f"{name}={left}{op}{right}")
            steps.append(f"{name}={values[left]}{op}{values[right]}={values[name]}")
            prev = name
        prompt = ",".join(defs) + f",?{prev}"
        solution = ",".join(steps) + f",{ANSWER_MARKER}{values[prev]}"
        return Problem(prompt=prompt, solution=solution, answer=values[prev], difficulty=d)

    def stream(self, split: str, seed: int, difficulties: tuple[int, ...] | None = None) -> Iterator[Problem]:
        """An endless, seeded stream of problems of one split (``train`` or ``eval``)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"arith-{split}-{seed}")
        want_eval = split == "eval"
        while True:
            d = rng.choice(difficulties) if difficulties else None
            problem = self.generate(rng, d)
            if _is_eval(problem.prompt) == want_eval:
                yield problem

    def split(self, split: str, n: int, seed: int, difficulties: tuple[int, ...] | None = None) -> list[Problem]:
        """``n`` distinct problems of one split."""
        out, seen = [], set()
        for problem in self.stream(split, seed, difficulties):
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                out.append(problem)
                if len(out) == n:
                    return out
        raise AssertionError("unreachable")


_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"\s*(-?\d+)")


def extract_answer(text: str) -> int | None:
    """The integer after the first answer marker, or ``None``."""
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def score_completion(completion: str, answer) -> float:
    """1.0 when the completion's final answer equals ``answer`` exactly, else 0.0."""
    got = extract_answer(completion)
    return float(got is not None and got == int(answer))
