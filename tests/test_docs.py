"""The Python examples in docs/*.md run as written."""

import re
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
EXAMPLES = [(doc.name, i, code) for doc in DOCS
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S))]


def test_the_docs_have_examples():
    assert {"pma.md", "phasegpt.md"} <= {name for name, _, _ in EXAMPLES}


@pytest.mark.parametrize("name, index, code", EXAMPLES, ids=[f"{n}-{i}" for n, i, _ in EXAMPLES])
def test_doc_example_runs(name, index, code):
    import torch

    torch.manual_seed(0)
    exec(compile(code, f"docs/{name} example {index}", "exec"), {"__name__": f"docs_{index}"})
