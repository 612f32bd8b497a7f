"""The README stays true: its Python examples run, and the commands it names exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no Python example"
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_names_the_two_commands_and_existing_entry_points():
    assert "make demo" in README and "make test" in README
    for script in set(re.findall(r"python (launch/\w+\.py)", README)):
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
    for config in set(re.findall(r"(configs/\w+\.yaml)", README)):
        assert (ROOT / config).is_file(), f"README names {config}, which does not exist"
