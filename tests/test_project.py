"""The README's two commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = _readme_commands()
    assert len(commands) >= 2
    head = text.split("\n\n", 3)
    assert head[0].startswith("# daml") and commands[0] in head[1] and commands[1] in head[2]
    assert commands[0].endswith("daml run")
    assert "pytest" in commands[1]
    for cmd in commands[:2]:
        assert "-c constraints.txt" in cmd


def test_ci_runs_exactly_the_readme_test_command():
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert _readme_commands()[1] in lines
    others = [ln for ln in lines if ln != _readme_commands()[1]]
    assert all(ln.startswith(("set ", "cd ")) for ln in others), others


def test_torch_is_pinned_for_the_commands_but_not_capped_for_users():
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", constraints, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_req = re.search(r'"torch([^"]*)"', pyproject).group(1)
    assert torch_req.startswith(">=") and "<" not in torch_req and "==" not in torch_req


def test_no_module_defines_a_top_level_name_or_method_twice():
    # a second definition silently replaces the first (an editing slip that tests of behaviour
    # can miss when both versions compute the same numbers)
    import ast

    for path in sorted((ROOT / "daml").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            seen = {}
            for node in scope.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    overloaded = any(isinstance(d, ast.Attribute) and d.attr in {"setter", "deleter"}
                                     or isinstance(d, ast.Name) and d.id == "overload" for d in node.decorator_list)
                    assert overloaded or node.name not in seen, \
                        f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} already defined at line {seen[node.name]}"
                    seen[node.name] = node.lineno
