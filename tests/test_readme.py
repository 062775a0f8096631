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
    assert "**2. Install and run the tests**" in ci and 'bash -eo pipefail -c "$cmd"' in ci
    assert "pytest" in readme_command(2)


def test_quickstart_command_names_a_real_recipe_and_sample():
    cmd = readme_command(1)
    m = re.search(r"fastlearn train (\S+) --data (\S+)", cmd)
    from fastlearn.recipes import list_recipes
    from fastlearn.samples import is_sample_name
    assert m and m.group(1) in list_recipes() and is_sample_name(m.group(2))


def test_cli_help_works_everywhere():
    for args in ([], ["train"], ["recipes"], ["lr-find"], ["doctor"], ["search"]):
        out = subprocess.run([sys.executable, "-m", "fastlearn.cli", *args, "--help"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "usage: fastlearn" in out.stdout, (args, out.stderr[-500:])
