"""The package's shape: imports point only down the layers, ``phaselm --help`` imports no torch,
``import phaselm`` loads only the models (everything else on first use)."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import from a lower layer, or from its own package (phaselm.nn.x from
# phaselm.nn.y); never from a higher layer, and never across packages of the same layer.
LAYERS = [
    ["phaselm.utils", "phaselm.manifest"],
    ["phaselm.nn"],
    ["phaselm.models"],
    ["phaselm.pretrained"],
    ["phaselm.data"],
    ["phaselm.sampling", "phaselm.training", "phaselm.interventions"],
    ["phaselm.evaluation"],
    ["phaselm.cli"],
    ["phaselm_cli"],
    ["phaselm.__main__", "phaselm"],
]


def _unit(module: str) -> str:
    """The layer entry a module belongs to (its longest matching prefix)."""
    best = max((u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py; add it to LAYERS")
    return best


def _rank(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path, module: str) -> list[str]:
    """Every phaselm module ``path`` imports, at top level or inside a function."""
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return [m for m in out if m.split(".")[0] in ("phaselm", "phaselm_cli")]


def test_imports_only_point_down():
    wrong = []
    for module, path in _modules():
        if "phase_slip_method" in module:  # the custom-generate folder transformers loads by path
            continue
        unit = _unit(module)
        for target in _imports(path, module):
            if target.count("."):
                # "from phaselm.x import y": y may be a module or a name; judge by the deepest module that exists
                while target.count(".") and not ((SRC / target.replace(".", "/")).with_suffix(".py").exists()
                                                 or (SRC / target.replace(".", "/") / "__init__.py").exists()):
                    target = target.rpartition(".")[0]
            t_unit = _unit(target)
            if t_unit == unit:
                continue
            if _rank(t_unit) >= _rank(unit):
                wrong.append(f"{module} imports {target} ({t_unit} is not below {unit})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def _python(code: str) -> tuple[str, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out, time.perf_counter() - start


def test_help_imports_no_torch_and_import_phaselm_loads_only_the_models():
    out, help_s = _python("import sys, contextlib, io\nimport phaselm_cli\n"
                          "with contextlib.redirect_stdout(io.StringIO()):\n"
                          "    try:\n        phaselm_cli.main(['--help'])\n    except SystemExit:\n        pass\n"
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'phaselm')))")
    assert out.strip() == "[]", f"phaselm --help imported {out.strip()}"
    out, import_s = _python("import sys, phaselm\n"
                            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('phaselm.')}))")
    assert out.strip() == "['models', 'nn']", f"import phaselm loaded {out.strip()}"
    out, _ = _python("import phaselm, sys\nphaselm.PhaseSlipSampler\nprint('phaselm.sampling' in sys.modules)")
    assert out.strip() == "True"
    _, base_s = _python("import torch\nfrom transformers import PreTrainedModel, GenerationMixin")
    print(f"\n  phaselm --help: {help_s:.2f} s;  import phaselm: {import_s:.2f} s;  "
          f"import torch + transformers' PreTrainedModel: {base_s:.2f} s  (wall, this machine)")


def test_lazy_names_resolve_and_unknown_names_fail():
    import phaselm

    for name in phaselm.__all__:
        assert getattr(phaselm, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        phaselm.nope
