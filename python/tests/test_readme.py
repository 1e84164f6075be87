"""The README's PyTorch example runs as written (from the repository root)."""

import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- python-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python example after <!-- python-example -->"
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in m.group(1).splitlines())
    assert len(code.strip().splitlines()) <= 10 + 2, "the example stays about ten lines"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "torch.Size([2, 4, 64]) tensor(True) torch.Size([10, 64])" in out, out
