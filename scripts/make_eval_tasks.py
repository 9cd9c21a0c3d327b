"""Generate the offline lm-eval task data that ships in raybig/eval/tasks/ (deterministic).

- arith_mc.jsonl: 50 multiple-choice arithmetic questions (4 choices; seeded).
- stdlib_docs.jsonl: 20 passages, docstrings of Python standard-library modules (text that is on
  every machine; regenerating on another Python version may change it, which is why it is shipped).

Usage: python scripts/make_eval_tasks.py [OUT_DIR]   (default: raybig/eval/tasks)
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "raybig" / "eval" / "tasks"
MODULES = ["json", "csv", "textwrap", "difflib", "heapq", "bisect", "fractions", "statistics",
           "functools", "itertools", "collections", "string", "shlex", "base64", "calendar",
           "argparse", "pathlib", "logging", "contextlib", "dataclasses", "enum", "random",
           "decimal", "datetime", "html", "gzip", "zipfile", "tempfile", "shutil", "copy", "os", "re",
           "subprocess", "threading", "queue", "pickle", "sqlite3", "unittest", "doctest", "pprint",
           "operator", "abc", "typing", "uuid", "hashlib", "hmac", "secrets", "struct", "io", "glob",
           "fnmatch", "inspect", "ast", "tokenize", "weakref", "types", "warnings", "sched", "timeit",
           "traceback", "tarfile", "configparser", "getopt", "locale", "gettext", "codecs"]


def arithmetic(n: int = 50, seed: int = 17) -> list[dict]:
    """`n` rows {id, question, choices: 4 strings, answer: index of the right one}, seeded."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op = rng.choice("+-*")
        ans = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong: set[int] = set()
        while len(wrong) < 3:
            w = ans + rng.choice([-10, -2, -1, 1, 2, 10, 3, -3])
            if w != ans:
                wrong.add(w)
        choices = [str(c) for c in sorted(wrong | {ans})]
        rng.shuffle(choices)
        rows.append({"id": i, "question": f"What is {a} {op} {b}?", "choices": choices,
                     "answer": choices.index(str(ans))})
    return rows


def docstrings(n: int = 20, lo: int = 200, hi: int = 1200) -> list[dict]:
    """`n` rows {id, source: module, text}: module docstrings cut to <= `hi` chars at a line end."""
    rows = []
    for name in MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        doc = doc.strip()
        if len(doc) < lo:
            continue
        if len(doc) > hi:  # cut at a paragraph (or line) end so passages stay short and whole
            cut = doc.rfind("\n\n", 0, hi)
            doc = doc[: cut if cut > lo else doc.rfind("\n", 0, hi)].strip()
        rows.append({"id": len(rows), "source": name, "text": doc})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} docstrings of {lo}..{hi} chars found; extend MODULES")
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    """Write both files into OUT_DIR (argv[1]) or the package's task dir."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "arith_mc.jsonl", arithmetic())
    write_jsonl(out / "stdlib_docs.jsonl", docstrings())
    print(f"wrote {out}/arith_mc.jsonl (50) and {out}/stdlib_docs.jsonl (20)")


if __name__ == "__main__":
    main()
