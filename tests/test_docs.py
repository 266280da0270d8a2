"""The README's generated parts match the code, and its test command is the one CI runs."""

from pathlib import Path

from ftkit.docs import block

README = Path(__file__).resolve().parent.parent / "README.md"


def test_recipe_reference_matches_schema():
    assert block() in README.read_text(encoding="utf-8"), "run: python -m ftkit.docs --write README.md"


def test_ci_runs_the_readme_test_command():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    i = lines.index("<!-- test-command -->")
    assert lines[i + 1] == "```bash" and "pytest" in lines[i + 2]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in ci
