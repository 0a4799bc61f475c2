"""``python -m jaxrl_llm.plan``: the planning subprocess (a request on stdin, results on stdout)."""
import sys

from jaxrl_llm.plan.report import worker

sys.exit(worker())
