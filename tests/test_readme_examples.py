"""Every example of README.md, as written.

The README's fenced ``bash`` and ``python`` blocks are parsed and run in a scratch folder (``configs``
linked from the repository), in README order:

* ``.venv/bin/phaselm ...`` lines run in this process (``phaselm_cli.main``); ``phaselm train`` gets
  :data:`TINY_TRAIN` appended (a few steps instead of minutes), and a ``train.max_iters=N`` it sets
  becomes a few steps more, so ``--resume`` has something to continue. Every other argument is the
  README's, and the run folders the later examples use are the ones these trains write.
* The embedded SmolLM2-135M is replaced by a tiny random Llama (``embedded_model_folder`` patched) so
  that the Phase-Slip examples run in seconds; the ``embedded``-marked test runs the first two Python
  blocks on the embedded model itself.
* Python blocks run in one namespace, as a reader pasting them in order would.
* Lines in :data:`PARSE_ONLY` are only parsed (argparse, or the Makefile target / script exists), for the
  reason given there. So are the commands of the "Measured" section (inline code, runs of minutes to hours).
"""
import contextlib
import io
import logging
import re
import shlex
from pathlib import Path

import pytest

from phaselm_cli import build_parser, main
from tests.conftest import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

TINY_TRAIN = ["train.max_iters=4", "train.eval_interval=4", "train.eval_max_tokens=2048", "train.batch_size=4",
              "train.log_interval=2", "train.warmup_iters=2"]
PARSE_ONLY = {
    "make demo": "creates .venv and installs packages; checked: the Makefile has the target",
    "make test": "runs the whole suite, this test included; checked: the Makefile has the target",
    "phaselm report interventions": "a K / R sweep over four prompt kinds; tests/test_pma.py runs it on a tiny run; "
                                    "parsed here",
}


def blocks(kind: str) -> list[str]:
    """The README's fenced code blocks of language ``kind``, in order."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M) if m.group(1) == kind]


def shell_commands() -> list[list[str]]:
    """Every command of the bash blocks as argv (comments and leading VAR=value assignments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv:
                out.append(argv)
    return out


def parse_only_reason(argv: list[str]) -> str | None:
    text = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv))
    return next((why for prefix, why in PARSE_ONLY.items() if text.startswith(prefix)), None)


def check_parses(argv: list[str]) -> None:
    """A command that is not run: the Makefile target exists, or phaselm's parser accepts its arguments."""
    if argv[0] == "make":
        assert re.search(rf"^{argv[1]}:", (ROOT / "Makefile").read_text(), re.M), argv
        return
    if Path(argv[0]).name == "torchrun":
        argv = argv[argv.index("phaselm") + 1:]
    elif Path(argv[0]).name == "python":
        assert (ROOT / argv[1]).is_file(), argv
        return
    else:
        argv = argv[1:]
    build_parser().parse_args(argv)


def tiny_train(argv: list[str]) -> list[str]:
    """``phaselm train CONFIG [key=value ...] [--resume]`` with :data:`TINY_TRAIN` (a README
    ``train.max_iters=N`` becomes 6: two steps more than the first run, for ``--resume``)."""
    argv = [("train.max_iters=6" if a.startswith("train.max_iters=") else a) for a in argv]
    keys = {a.split("=")[0] for a in argv if "=" in a}
    flags = [a for a in argv if a.startswith("--")]
    return [a for a in argv if not a.startswith("--")] + [a for a in TINY_TRAIN if a.split("=")[0] not in keys] + flags


@pytest.fixture(scope="module")
def tiny_embedded(tmp_path_factory):
    """A tiny random Llama and the test tokenizer, saved as a model folder (the embedded model's stand-in)."""
    folder = tmp_path_factory.mktemp("embedded") / "tiny"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory, tiny_embedded):
    """A scratch folder where every shell example of the README has run, in order:
    ``(folder, [(argv, exit status or parse-only reason, stdout, stderr)])``."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setattr("phaselm.pretrained.embedded_model_folder", lambda: tiny_embedded)
        ran = []
        for argv in shell_commands():
            why = parse_only_reason(argv)
            if why:
                check_parses(argv)
                ran.append((argv, why, "", ""))
                continue
            assert Path(argv[0]).name == "phaselm", f"README command not handled by this test: {shlex.join(argv)}"
            args = tiny_train(argv[1:]) if argv[1] == "train" else argv[1:]
            out, err = io.StringIO(), io.StringIO()
            handler = logging.StreamHandler(err)  # phaselm's log lines reach stderr, as outside pytest
            logging.getLogger("phaselm").addHandler(handler)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(args)
            finally:
                logging.getLogger("phaselm").removeHandler(handler)
            ran.append((argv, code, out.getvalue(), err.getvalue()))
    return folder, ran


def test_every_shell_example_runs(readme_dir):
    _, ran = readme_dir
    assert len(ran) >= 15
    for argv, code, out, err in ran:
        if isinstance(code, str):
            continue  # parse-only, with its reason
        assert code == 0, f"{shlex.join(argv)} exited {code}: {err.strip().splitlines()[-1:]}"
    runs = {" ".join(argv[1:3]): out for argv, code, out, _ in ran if code == 0}
    assert runs["sample runs/gpt/shakespeare_char_cpu"].startswith("ROMEO:")
    outputs = [(argv, out, err) for argv, _, out, err in ran if argv[1:2] == ["sample"]]
    assert len(outputs) == 2
    for argv, out, err in outputs:  # up to 200 new tokens (an end-of-text token may stop it) past the context
        sampler = argv[argv.index("--sampler") + 1] if "--sampler" in argv else "standard"
        assert re.search(rf"\[{sampler}: \d+ tokens", err), err
        assert err.count("slides a window over the last 128 tokens") == 1, err  # one note


def test_parse_only_examples_say_why():
    parsed = [argv for argv in shell_commands() if parse_only_reason(argv)]
    assert {Path(a[0]).name for a in parsed} <= {"make", "phaselm"} and len(parsed) >= 3


def test_inline_commands_use_one_form_and_parse():
    """The README's inline commands (the "Measured" section's reproduction commands) use one form,
    ``.venv/bin/...`` (after ``OMP_NUM_THREADS=1`` where set; never a bare ``python``, ``torchrun`` or
    ``pytest``), and parse: phaselm's own parser, or the script / test file exists."""
    found = 0
    for code in re.findall(r"`([^`\n]+)`", README):
        argv = shlex.split(code)
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv = argv[1:]
        if not argv:
            continue
        assert argv[0] not in ("python", "python3", "torchrun", "pytest"), f"bare command in README: {code}"
        if not argv[0].startswith(".venv/bin/"):
            continue  # prose ("`phaselm sample RUN PROMPT`"), not a command to paste
        if argv[1:3] == ["-m", "pytest"]:
            assert (ROOT / next(a for a in argv if a.startswith("tests/")).split("::")[0]).exists(), code
        elif len(argv) > 1:
            check_parses(argv)
        found += 1
    assert found >= 5


def test_every_python_example_runs(readme_dir, tiny_embedded, monkeypatch, capsys):
    folder, _ = readme_dir
    monkeypatch.chdir(folder)
    monkeypatch.setattr("phaselm.pretrained.embedded_model_folder", lambda: tiny_embedded)
    namespace: dict = {}
    python = blocks("python")
    assert len(python) >= 4
    for i, code in enumerate(python):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert "ROMEO:" in capsys.readouterr().out


def test_interpret_on_a_pma_run_is_refused_in_one_line(readme_dir, capsys):
    """`phaselm interpret runs/pma/tiny` (a PMA run from the README) ends in one line, not a traceback."""
    folder, _ = readme_dir
    assert main(["interpret", str(folder / "runs" / "pma" / "tiny"), "--split", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no phase layers" in err[0] and "phaselm report interventions" in err[0], err


@pytest.mark.embedded
def test_phase_slip_examples_on_the_embedded_model(embedded, capsys):
    """The first two Python blocks ("Phase-Slip in five lines", "Inside model.generate") with the real
    embedded SmolLM2-135M, as a reader runs them (about 40 s on 2 cores)."""
    namespace: dict = {}
    for i, code in enumerate(blocks("python")[:2]):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert "| selected |" in capsys.readouterr().out
