"""Run folders load anywhere: trust_remote_code in a process that never imported phaselm, and the
SHA-256 manifest checked by every loader (verify_folder; from_pretrained; phaselm sample)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phaselm.manifest import CheckpointError, verify_folder
from phaselm.training import checkpoint as ckpt
from tests.test_checkpoint import setup_run

# What a user of transformers types, in a fresh interpreter: phaselm is installed but never imported.
LOAD = """
import json, sys
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
assert "phaselm" not in sys.modules
run, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(run)
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
base = AutoModel.from_pretrained(run, trust_remote_code=True).eval()
with torch.no_grad():
    hidden = base(ids).last_hidden_state
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "ids": ids[0].tolist(),
                  "logits": logits.tolist(), "architectures": model.config.architectures,
                  "base": type(base).__name__, "hidden": hidden.tolist()}))
"""


def fresh_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(cwd / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained PhaseGPT run folder (2 steps, 3 checkpoints kept: step-1 and step-2)."""
    tmp = tmp_path_factory.mktemp("load_anywhere")
    return Path(setup_run(tmp).train.out_dir)


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run folder (top-level files become copies, not hard links)."""
    return Path(shutil.copytree(run, dest / "run"))


def reference_logits(run: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def flip_bytes(path: Path, in_place: bool = True) -> None:
    """Damage the last bytes of a file's tensor data: in place (a hard-linked checkpoint file is damaged
    with it) or by writing a new file in its place (the checkpoint's copy stays intact)."""
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])
    if in_place:
        with open(path, "r+b") as f:
            f.write(data)
    else:
        path.unlink()
        path.write_bytes(bytes(data))


def test_a_run_folder_names_its_class_and_ships_a_remote_code_shim_the_manifest_covers(run):
    config = json.loads((run / "config.json").read_text())
    assert config["architectures"] == ["PhaseGPTForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_phaselm.PhaseGPTConfig",
                                  "AutoModelForCausalLM": "modeling_phaselm.PhaseGPTForCausalLM",
                                  "AutoModel": "modeling_phaselm.PhaseGPTModel"}
    newest = ckpt.step_folders(run)[0]
    assert "modeling_phaselm.py" in ckpt.verify(newest)["files"]
    assert (run / "modeling_phaselm.py").read_bytes() == (newest / "modeling_phaselm.py").read_bytes()


def test_a_run_folder_loads_with_trust_remote_code_where_phaselm_was_never_imported(run, tmp_path):
    proc = fresh_python(LOAD, str(run), "ROMEO. B", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == "phaselm.models.phasegpt.PhaseGPTForCausalLM"
    assert out["architectures"] == ["PhaseGPTForCausalLM"]
    # the same weights as phaselm's own loader: the logits are equal, bit for bit
    assert torch.equal(torch.tensor(out["logits"]), reference_logits(run, out["ids"]))
    from transformers import AutoModel

    assert out["base"] == "PhaseGPTModel"  # AutoModel: the base model, through auto_map too
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(run).eval()(torch.tensor([out["ids"]])).last_hidden_state
    assert torch.equal(torch.tensor(out["hidden"]), hidden)


@pytest.mark.parametrize("kind", ["gpt", "gpt-untied", "pma"])
def test_every_model_kind_saves_an_auto_map_that_loads_in_a_fresh_process(kind, tmp_path):
    from safetensors import safe_open

    from phaselm.data.datasets import get_tokenizer
    from phaselm.models import MODELS, create_tiny_config

    tok = get_tokenizer("char", "abcdefgh ")
    sizes = dict(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    if kind == "gpt-untied":
        sizes["tie_word_embeddings"] = False
    config = create_tiny_config(n_ssm=1, d_state=4, **sizes) if kind == "pma" else MODELS[kind[:3]][0](**sizes)
    torch.manual_seed(0)
    model = MODELS[kind[:3]][1](config).eval()
    if kind == "gpt-untied":
        with torch.no_grad():
            model.lm_head.weight.normal_()  # a head of its own, saved and loaded as such
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_checkpoint(tmp_path / "run", 1, model, optimizer, {}, {"config": {}}, tokenizer=tok.tok)
    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as f:  # a tied head is stored once, as its source
        assert ("lm_head.weight" in f.keys()) == (kind == "gpt-untied") and "model.wte.weight" in f.keys()
    proc = fresh_python(LOAD, str(tmp_path / "run"), "bad cafe", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == f"{type(model).__module__}.{type(model).__name__}"
    with torch.no_grad():
        assert torch.equal(torch.tensor(out["logits"]), model(torch.tensor([out["ids"]])).logits)


def test_a_run_folder_without_auto_map_still_loads_through_phaselm(run, tmp_path):
    """A run saved before run folders carried auto_map: no shim, no architectures."""
    from transformers import AutoModelForCausalLM

    old = copy_run(run, tmp_path)
    for folder in [old, *ckpt.step_folders(old)]:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                        if k not in ("auto_map", "architectures")}))
        (folder / "modeling_phaselm.py").unlink()
        if folder != old:
            state = json.loads((folder / "state.json").read_text())
            ckpt.write_manifest(folder, {k: v for k, v in state.items() if k not in ("files", "state_sha256")})
    verify_folder(old)  # the edited files match the re-recorded manifest
    ids = [3, 5, 7, 1]
    model = AutoModelForCausalLM.from_pretrained(old).eval()
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, reference_logits(run, ids))


# ---------------------------------------------------------------- the manifest, checked by every loader
def test_verify_folder_checks_checkpoints_and_run_folders_and_passes_plain_folders(run, tmp_path):
    newest = ckpt.step_folders(run)[0]
    assert verify_folder(run)["step"] == 2 and verify_folder(newest)["step"] == 2
    assert verify_folder(str(run)) is not None  # str or Path
    assert verify_folder("HuggingFaceTB/SmolLM2-135M") is None  # a hub name: nothing local to check
    assert verify_folder(None) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(run / name, plain / name)
    assert verify_folder(plain) is None  # a plain transformers folder has no manifest


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "replaced"])
def test_flipped_bytes_in_the_run_folders_weights_are_refused_in_one_line(run, tmp_path, in_place):
    damaged = copy_run(run, tmp_path)
    newest = ckpt.step_folders(damaged)[0]
    os.unlink(damaged / "model.safetensors")
    os.link(newest / "model.safetensors", damaged / "model.safetensors")  # as training publishes it
    flip_bytes(damaged / "model.safetensors", in_place=in_place)
    with pytest.raises(CheckpointError) as err:
        verify_folder(damaged)
    message = str(err.value)
    assert "\n" not in message and "model.safetensors is damaged" in message and str(damaged) in message
    if not in_place:  # the checkpoint's own copy is intact, and still loads
        assert verify_folder(newest)["step"] == 2


@pytest.mark.parametrize("name", ["modeling_phaselm.py", "config.json", "tokenizer.json"])
def test_every_published_file_is_checked_the_remote_code_shim_included(run, tmp_path, name):
    damaged = copy_run(run, tmp_path)
    (damaged / name).write_bytes((damaged / name).read_bytes() + b"\n# edited\n")
    with pytest.raises(CheckpointError, match=f"{name} is damaged"):
        verify_folder(damaged)
    (damaged / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        verify_folder(damaged)


def test_a_run_folder_that_still_holds_an_older_checkpoints_files_passes(run, tmp_path):
    """A save killed between renaming its checkpoint and publishing it leaves the previous model."""
    stale = copy_run(run, tmp_path)
    older = ckpt.step_folders(stale)[1]
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(older / name, stale / name)
    assert verify_folder(stale)["step"] == 1


def test_from_pretrained_refuses_a_run_folder_with_damaged_weights(run, tmp_path):
    from transformers import AutoModelForCausalLM

    damaged = copy_run(run, tmp_path)
    flip_bytes(damaged / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        AutoModelForCausalLM.from_pretrained(damaged)


def test_phaselm_sample_refuses_a_run_folder_with_damaged_weights(run, tmp_path, capsys):
    from phaselm_cli import main

    damaged = copy_run(run, tmp_path)
    flip_bytes(damaged / "model.safetensors")
    assert main(["sample", str(damaged), "RO", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors is damaged" in err[0]


def test_a_run_folder_tells_generate_its_special_tokens_and_pads_batches_on_the_left(run):
    """generation_config.json carries the char tokenizer's end-of-text id (bos, eos and pad), the
    tokenizer pads on the left, and a padded batch generates each row's unbatched greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(run), AutoTokenizer.from_pretrained(run)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (eos, eos, eos) == (tok.eos_token_id,) * 3
    assert tok.padding_side == "left" and tok.pad_token_id == eos
    prompts = ["ROM", "A", "To"]  # within the 8-token context of this run
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0] == eos and batch["attention_mask"][1, 0] == 0  # left padding
    rows = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:]
    for prompt, row in zip(prompts, rows):
        alone = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=5, do_sample=False)[0, -5:]
        assert row.tolist() == alone.tolist()
