"""Text datasets, tokenisers and memory-mapped token caches for training and evaluation.

Datasets (``load_splits(name, path)``):

* ``shakespeare``: the 37 plays (~4.85 MB), split per play 90/5/5 (:mod:`phaselm.data.corpora`);
* ``tiny-shakespeare``: the same split of 9 fixed plays (:data:`TINY_PLAYS`, ~1.15 MB), the
  CPU-scale corpus;
* ``python-docs``: the Python 3.11 documentation from Debian's ``python3.11-doc`` (~11 MB of
  mixed English), split per page 90/5/5; the offline stand-in for WikiText-2;
* ``text``: a local file or a folder of ``*.txt`` files (``path=``), split the same way (per file);
* any other name: a Hugging Face ``datasets`` dataset (e.g. ``wikitext-2-raw-v1``), for users
  online; offline this is a one-line error that says so.

Tokenisers (``get_tokenizer(spec, text)``, transformers tokenizers that ``save_pretrained`` into a
checkpoint and load back with ``AutoTokenizer``): ``"char"`` (vocabulary = the sorted characters of
``text``; the trainer passes all splits, as nanoGPT does, so that a character seen only in val or
test still has an id; the set of characters carries no information about their order), ``"bpe"``
(the embedded SmolLM2 tokenizer), or any tokenizer name/folder that ``transformers.AutoTokenizer``
loads. Token ids of a split are cached once as a flat ``uint16``/``uint32`` array under
``$PHASELM_CACHE_DIR/tokens`` and opened with ``np.memmap``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phaselm.data import corpora
from phaselm.utils import atomic_write, cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_PLAYS = ("hamlet", "macbeth", "romeo_and_juliet", "julius_caesar", "tempest", "midsummer_nights_dream",
              "othello", "lear", "twelfth_night")
HUB_ALIASES = {"wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"), "wikitext-103-raw-v1": ("wikitext", "wikitext-103-raw-v1")}


def load_splits(name: str, path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"train": text, "val": text, "test": text}`` of a dataset (see the module doc)."""
    if name == "shakespeare":
        return {s: corpora.shakespeare(s) for s in corpora.SPLITS}
    if name == "tiny-shakespeare":
        plays = corpora.shakespeare_plays()
        return {s: "".join(corpora.split_text(plays[p], s) for p in TINY_PLAYS) for s in corpora.SPLITS}
    if name == "python-docs":
        docs = corpora.python_docs().values()
        return {s: "".join(corpora.split_text(d, s) for d in docs) for s in corpora.SPLITS}
    if name == "text":
        return _local_splits(path)
    return _hub_splits(name)


def _local_splits(path) -> dict[str, str]:
    if path is None:
        raise ValueError("data.path: dataset 'text' needs a path to a .txt file or a folder of .txt files")
    p = Path(path).expanduser()
    files = sorted(p.glob("**/*.txt")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise ValueError(f"data.path: {p} does not exist or holds no .txt files")
    docs = [f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n") for f in files]
    return {s: "".join(corpora.split_text(d, s) for d in docs) for s in corpora.SPLITS}


def _hub_splits(name: str) -> dict[str, str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.name: '{name}' is not a built-in dataset (shakespeare, tiny-shakespeare, text); "
                         "hub datasets need `pip install datasets`") from None
    args = HUB_ALIASES.get(name, (name,))
    try:
        ds = datasets.load_dataset(*args)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, ...
        raise ValueError(f"data.name: could not load the hub dataset '{name}' ({type(err).__name__}); it needs the "
                         "Hugging Face Hub (offline here?). Use shakespeare, tiny-shakespeare or text with data.path") from None
    names = {"train": "train", "val": "validation" if "validation" in ds else "val", "test": "test"}
    return {s: "\n".join(ds[n]["text"]) for s, n in names.items()}


def split_hashes(splits: dict[str, str]) -> dict[str, str]:
    """sha256 of each split's UTF-8 text (the split is identical on every machine iff these are)."""
    return {s: hashlib.sha256(t.encode("utf-8")).hexdigest() for s, t in splits.items()}


EOS_TOKEN = "<|endoftext|>"  # a char tokenizer's end-of-text token (also its BOS, as GPT-2's)
UNK_TOKEN = "<unk>"  # a char tokenizer's unknown token: a character outside the vocabulary


def char_vocab(text: str) -> list[str]:
    """The vocabulary of a char tokenizer for ``text``: its sorted characters, then
    :data:`EOS_TOKEN` and :data:`UNK_TOKEN` (so a character's id is its rank among the characters)."""
    return sorted(set(text)) + [EOS_TOKEN, UNK_TOKEN]


def char_tokenizer(chars) -> PreTrainedTokenizerFast:
    """A transformers tokenizer (built with ``tokenizers``) whose tokens are ``chars`` in id order
    (id = index): single characters, each its own token, and :data:`EOS_TOKEN` / :data:`UNK_TOKEN`
    where listed (:func:`char_vocab` lists both). Those become the tokenizer's end-of-text (and
    beginning-of-text) token and its unknown token: an unseen character encodes to the unknown id.
    Without them (a vocabulary saved by an older phaselm) the tokenizer has no special tokens and an
    unseen character is an error. Decoding concatenates; ``save_pretrained`` /
    ``AutoTokenizer.from_pretrained`` round-trip it. The end-of-text token also pads, on the left
    (batched generation, as transformers expects of decoder-only models)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(chars)}
    if len(vocab) != len(chars):
        raise ValueError("a char tokenizer's vocabulary lists a token twice")
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN if UNK_TOKEN in vocab else None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    special = {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False, padding_side="left",
                                   **{k: v for k, v in special.items() if v in vocab})


def token_id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A transformers tokenizer for synthetic token-id data (:mod:`phaselm.data.tasks`): token i is
    the word ``str(i)``, so ``"3 17 5"`` encodes to ``[3, 17, 5]`` and decodes back (spaces between
    ids); it saves into a checkpoint like any tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({str(i): i for i in range(vocab_size)}, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False)


class TextTokenizer:
    """A transformers tokenizer (``.tok``) with what the trainer needs: ``encode`` (no special
    tokens; an unknown character is a one-line error for a char tokenizer, whose ``.tok`` would
    encode it as its unknown token), ``decode``, ``vocab_size`` (special tokens included) and
    ``to_json`` (the identity used to cache token ids)."""

    def __init__(self, tokenizer, name: str):
        self.tok, self.name = tokenizer, name
        self.vocab_size = len(tokenizer)
        vocab = tokenizer.get_vocab()
        self.chars = sorted(vocab, key=vocab.get) if name == "char" else None  # the special tokens too
        self._char_ids = {c: i for c, i in vocab.items() if len(c) == 1} if name == "char" else {}

    @classmethod
    def from_text(cls, text: str) -> "TextTokenizer":
        """A char tokenizer over the sorted characters of ``text`` (plus EOS and UNK: :func:`char_vocab`)."""
        return cls(char_tokenizer(char_vocab(text)), "char")

    def encode(self, text: str) -> list[int]:
        if self.chars is None:
            return self.tok(text, add_special_tokens=False)["input_ids"]
        if unknown := set(text) - self._char_ids.keys():
            raise ValueError(f"character {sorted(unknown)[0]!r} is not in the character vocabulary of this tokenizer; "
                             "a char tokenizer encodes only the characters of the text it was built from")
        return [self._char_ids[c] for c in text]  # the text as written: "<unk>" in it is five characters

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars} if self.chars is not None
                          else {"type": "hf", "name": self.name})

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        """The tokenizer :meth:`to_json` described (a char vocabulary exactly as saved, special tokens
        or not: a run trained before char tokenizers had them keeps its ids)."""
        spec = json.loads(text)
        return cls(char_tokenizer(spec["chars"]), "char") if spec["type"] == "char" else get_tokenizer(spec["name"])


def get_tokenizer(spec: str, text: str | None = None) -> TextTokenizer:
    """``"char"`` (its vocabulary: the characters of ``text``), ``"bpe"`` (the embedded model's
    tokenizer), a saved tokenizer folder (e.g. a trained run's checkpoint) or a tokenizer name."""
    if spec == "char":
        if text is None:
            raise ValueError("tokenizer 'char' needs a text to build its vocabulary from")
        return TextTokenizer.from_text(text)
    from transformers import AutoTokenizer

    if spec == "bpe":
        from phaselm.pretrained import embedded_model_folder

        return TextTokenizer(AutoTokenizer.from_pretrained(embedded_model_folder()), "bpe")
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer: could not load '{spec}' ({str(err).splitlines()[0]}); use char, bpe, a local "
                         "tokenizer folder, or a hub name while online") from None
    special = set(tok.all_special_tokens)
    return TextTokenizer(tok, "char" if all(len(t) == 1 or t in special for t in tok.get_vocab()) else spec)


def tokenized(text: str, tokenizer) -> np.ndarray:
    """The token ids of ``text`` as a read-only memory-mapped array, cached by (text, tokenizer)."""
    key = hashlib.sha256((tokenizer.to_json() + "\0").encode() + text.encode("utf-8")).hexdigest()[:20]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    path = cache_dir() / "tokens" / f"{key}.{np.dtype(dtype).name}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.asarray(tokenizer.encode(text), dtype=dtype)
        atomic_write(path, ids.tobytes())  # concurrent runs may build it at once: each writes its own temp file
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")
