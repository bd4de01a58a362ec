"""A JA-EN lexicon for stage 2's dictionary check (is a headword's nearest English token its gloss?): common JMdict
words and their first English gloss, read with ``sqlite3`` from the ``jamdict-data`` package (CC-BY-SA 3.0, EDRDG).
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from pathlib import Path

from .data import Pair, normalize_text

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
