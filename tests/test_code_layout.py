"""Size limits that keep the library readable: modules of at most 500 lines, and functions of at most 60 lines in
the trainer and the sampler, the code a contributor changes most."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxrl_llm"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_trainer_or_sampler_function_is_over_60_lines():
    long = {}
    for sub in ("trainer", "sampling"):
        for path in (PACKAGE / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                        long[f"{path.relative_to(PACKAGE)}:{node.name}"] = n
    assert not long, long


def test_the_limits_see_the_code():
    # the walks above find the package's modules and functions (an empty walk would pass anything)
    assert len(list((PACKAGE / "trainer").rglob("*.py"))) > 3
    assert any(isinstance(n, ast.FunctionDef) for n in ast.walk(ast.parse((PACKAGE / "trainer" / "rl.py").read_text())))
