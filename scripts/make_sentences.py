"""Build the English sentence sets used to calibrate and evaluate the MiniLM optimizer runs.

Sentences come from the docstrings of Python's standard library (real English prose, PSF licence),
shuffled with a fixed seed and split into disjoint sets:

    tandem/default_repo/embeddings/calibration.jsonl   256 requests ({"text": ...}) for `tandem optimize`
    benchmarks/data/heldout_sentences.txt              600 held-out sentences for benchmarks/optimize.py

Run once with the repository's Python (3.11); the outputs are committed, so nothing depends on the
Python version at run time:  .venv/bin/python scripts/make_sentences.py
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data"}
N_CALIBRATION, N_HELDOUT = 256, 600


def _docstrings(name: str) -> list[str]:
    try:
        mod = importlib.import_module(name)
    except Exception:  # some stdlib modules need optional system libraries
        return []
    docs = [inspect.getdoc(mod) or ""]
    for _, obj in inspect.getmembers(mod):
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == name:
            docs.append(inspect.getdoc(obj) or "")
    return docs


def _sentences(doc: str) -> list[str]:
    out = []
    for para in doc.split("\n\n"):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            words = s.split()
            prose = len(words) >= 7 and sum(w.isalpha() for w in words) / len(words) > 0.7
            if 40 <= len(s) <= 300 and s[0].isupper() and s.endswith(".") and prose \
                    and not re.search(r"[>{}\[\]=_()|\\]|::", s):
                out.append(s)
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(m.name for m in pkgutil.iter_modules([stdlib]) if not m.name.startswith("_") and m.name not in SKIP)
    seen: dict[str, None] = {}
    for name in names:
        for doc in _docstrings(name):
            for s in _sentences(doc):
                seen.setdefault(s, None)
    sentences = list(seen)
    random.Random(0).shuffle(sentences)
    if len(sentences) < N_CALIBRATION + N_HELDOUT:
        sys.exit(f"only {len(sentences)} sentences found")
    calib, heldout = sentences[:N_CALIBRATION], sentences[N_CALIBRATION:N_CALIBRATION + N_HELDOUT]
    (ROOT / "tandem/default_repo/embeddings/calibration.jsonl").write_text(
        "".join(json.dumps({"text": s}) + "\n" for s in calib))
    (ROOT / "benchmarks/data/heldout_sentences.txt").write_text("".join(s + "\n" for s in heldout))
    print(f"{len(sentences)} sentences: {len(calib)} calibration, {len(heldout)} held out")


if __name__ == "__main__":
    main()
