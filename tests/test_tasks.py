"""The arithmetic task: answers verified by an independent evaluator, split disjointness, scoring."""
import ast
import operator
import random
import re

import pytest

from jaxrl_llm.tasks.arith import ArithTask, extract_answer, score_completion, worked_solution


def _independent_answer(prompt: str) -> int:
    """Evaluate the prompt text with Python's own parser (mod 10 after every operation)."""
    *defs, query = prompt.split(",")
    env = {}
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def ev(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        return ops[type(node.op)](ev(node.left), ev(node.right)) % 10

    for d in defs:
        name, expr = d.split("=")
        env[name] = ev(ast.parse(expr, mode="eval").body)
    return env[query.lstrip("?")]


@pytest.mark.parametrize("shape", [{}, {"num_literals": 3, "operands": "literal"}])
@pytest.mark.parametrize("difficulty", range(1, 9))
def test_answers_and_solutions_are_correct(difficulty, shape):
    task = ArithTask(1, 8, **shape)
    rng = random.Random(difficulty)
    for _ in range(50):
        p = task.generate(rng, difficulty)
        assert p.answer == _independent_answer(p.prompt)
        assert p.prompt.count("=") == task.num_literals + difficulty
        steps = p.solution.split(",")
        assert len(steps) == difficulty + 1 and steps[-1] == f"#{p.answer}"
        for step in steps[:-1]:  # every worked step is arithmetically right
            m = re.fullmatch(r"([a-z])=(\d)([+\-*])(\d)=(\d)", step)
            a, op, b, c = int(m[2]), m[3], int(m[4]), int(m[5])
            assert {"+": a + b, "-": a - b, "*": a * b}[op] % 10 == c
        assert score_completion(p.solution, p.answer) == 1.0


def test_target_depends_on_every_operation():
    task = ArithTask(3, 3)
    p = task.generate(random.Random(0))
    defs = dict(d.split("=") for d in p.prompt.split(",")[:-1])
    needed, frontier = set(), [p.prompt.split("?")[1]]
    while frontier:
        v = frontier.pop()
        needed.add(v)
        frontier += [c for c in re.findall(r"[a-z]", defs[v]) if c not in needed]
    ops = [k for k, v in defs.items() if not v.isdigit()]
    assert set(ops) <= needed


def test_splits_do_not_overlap_and_are_deterministic():
    task = ArithTask(1, 3)
    train = task.split("train", 2000, seed=0)
    evals = task.split("eval", 300, seed=0) + task.split("eval", 300, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    assert [p.prompt for p in task.split("train", 50, seed=0)] == [p.prompt for p in train[:50]]
    assert {p.difficulty for p in task.split("eval", 100, seed=0, difficulties=(2,))} == {2}


def test_extract_and_score():
    assert extract_answer("a=1+2=3,#3") == 3
    assert extract_answer("no marker 5") is None
    assert score_completion("x,# 7<|im_end|>", 7) == 1.0
    assert score_completion("#8", "7") == 0.0
    with pytest.raises(ValueError):
        ArithTask(3, 2)
    with pytest.raises(ValueError, match="split"):
        next(ArithTask().stream("test", 0))


def test_worked_solution_and_slips():
    task = ArithTask(1, 6)
    problems = task.split("train", 300, seed=5)
    # without slips the solution re-derived from the problem text is the generator's own
    assert all(worked_solution(p.prompt) == p.solution for p in problems)
    rng = random.Random(0)
    steps = wrong_steps = 0
    for p in problems:
        noisy = worked_solution(p.prompt, rng, 0.2)
        # every step still states an operation on the values carried so far; count the results that are wrong
        for step in noisy.split(",")[:-1]:
            m = re.fullmatch(r"[a-z]=(\d)([-+*])(\d)=(\d)", step)
            assert m, step
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            steps += 1
            wrong_steps += r != {"+": (a + b) % 10, "-": (a - b) % 10, "*": (a * b) % 10}[op]
        assert noisy.rsplit("#", 1)[1] == noisy.split(",")[-2].rsplit("=", 1)[1]  # the answer follows the steps
    assert abs(wrong_steps / steps - 0.2) < 0.04  # ~1000 steps: 4 standard deviations
    with pytest.raises(ValueError, match="slip_rate"):
        worked_solution(problems[0].prompt, rng, 1.0)


def test_literal_operands_chain_results_through_literals():
    task = ArithTask(1, 8, num_literals=3, operands="literal")
    for p in task.split("train", 200, seed=2):
        defs = [d.split("=") for d in p.prompt.split(",")[:-1]]
        literals = {name for name, rhs in defs if rhs.isdigit()}
        assert len(literals) == 3
        prev = defs[2][0]
        for name, rhs in defs[3:]:
            left, right = rhs[0], rhs[2]
            assert prev in (left, right)  # every operation extends the chain
            assert ({left, right} - {prev}) <= literals  # and its other operand is a literal
            prev = name
    with pytest.raises(ValueError, match="operands"):
        ArithTask(1, 2, operands="some")
