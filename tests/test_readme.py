"""README's two commands exist, and CI runs the test command verbatim."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_command(n: int) -> str:
    text = (ROOT / "README.md").read_text()
    marker = {1: "**1. Install and run the quickstart**", 2: "**2. Install and run the tests**"}[n]
    return re.search(r"```bash\n(.+?)\n```", text.split(marker, 1)[1], re.S).group(1).strip()


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "**1. Install and run the quickstart**" in ci and "**2. Install and run the tests**" in ci
    assert ci.count('bash -eo pipefail -c "$cmd"') == 2 and "accuracy=" in ci
    assert "pytest" in readme_command(2) and "build_docs.sh" in readme_command(2)
    for n in (1, 2):  # each starts in its own fresh venv, as a newcomer's shell would
        assert readme_command(n).startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")


def test_quickstart_command_names_a_real_recipe_and_sample():
    cmd = readme_command(1)
    m = re.search(r"fastlearn train (\S+) --data (\S+)", cmd)
    from fastlearn.core.recipes import list_recipes
    from fastlearn.data.samples import is_sample_name
    assert m and m.group(1) in list_recipes() and is_sample_name(m.group(2))


def test_cli_help_works_everywhere_and_prints_nothing_on_stderr():
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # what a user sees: no warning filters
    for args in ([], ["train"], ["recipes"], ["lr-find"], ["doctor"], ["search"]):
        out = subprocess.run([sys.executable, "-m", "fastlearn.cli", *args, "--help"], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, env=env)
        assert out.returncode == 0 and "usage: fastlearn" in out.stdout, (args, out.stderr[-500:])
        assert out.stderr == "", (args, out.stderr[-2000:])   # e.g. torch's torch.jit.script FutureWarning


def _quickstart_paragraph() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("**1. Install and run the quickstart**", 1)[1].split("```bash", 1)[0]


def _figures(text: str) -> dict:
    "The accuracy range (e.g. 0.94-0.98 or 97-99%) and the minutes range (e.g. 1.5-3 minutes) a text states."
    acc = re.search(r"accuracy\D{0,20}?(\d*\.?\d+%?\s*-\s*\d*\.?\d+%?)", text, re.S)
    mins = re.search(r"(\d+(?:\.\d+)?\s*-\s*\d+(?:\.\d+)?)\s+minutes", text)
    return {"accuracy": acc and acc.group(1), "minutes": mins and mins.group(1)}


def test_quickstart_figures_are_the_digits_recipes():
    "README's quickstart states the digits recipe's `expected` figures (update both when re-measuring)."
    from fastlearn.core.recipes import load_recipe
    readme, recipe = _figures(_quickstart_paragraph()), _figures(load_recipe("digits").expected)
    assert recipe["accuracy"] and recipe["minutes"], load_recipe("digits").expected
    assert readme == recipe, (readme, recipe)
