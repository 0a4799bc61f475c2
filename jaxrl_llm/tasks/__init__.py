"""Generated, verifiable reasoning tasks."""
from jaxrl_llm.tasks.arith import (ANSWER_MARKER, ArithTask, Problem, extract_answer, score_completion,
                                   worked_solution)

__all__ = ["ANSWER_MARKER", "ArithTask", "Problem", "extract_answer", "score_completion", "worked_solution"]
