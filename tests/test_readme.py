"""Every ```python block of README.md runs as written, each in a fresh interpreter."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# The optional libraries a block may need, and the extra that installs each.
OPTIONAL = {"baal": "baal", "skactiveml": "skactiveml", "modAL": "modal", "small_text": "small-text",
            "batchbald_redux": "batchbald"}


def _blocks() -> list[tuple[str, str]]:
    """(the heading above it, the code) for each python block."""
    blocks, heading = [], "README"
    for part in re.split(r"(?m)^(#{2,3} .*)$", README):
        if re.match(r"#{2,3} ", part):
            heading = part.lstrip("# ").strip()
            continue
        blocks += [(heading, code) for code in re.findall(r"```python\n(.*?)```", part, flags=re.S)]
    return blocks


BLOCKS = _blocks()


def test_the_readme_has_its_examples():
    assert any(h == "README" or "ensel" in code for h, code in BLOCKS)
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("heading, code", BLOCKS, ids=[f"{i}-{h[:30]}" for i, (h, _) in enumerate(BLOCKS)])
def test_readme_block_runs(heading, code, tmp_path):
    for module, extra in OPTIONAL.items():
        if re.search(rf"(?m)^\s*(import|from) {module}\b", code) and importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install 'ensel[{extra}]'")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ENSEL_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"the block under '{heading}' failed:\n{res.stderr[-3000:]}"
