#!/usr/bin/env python
"""Generate an instruction-tuning dataset offline: templated arithmetic and string tasks.

Every answer is computed, so it is correct. Output is jsonl, one record per line:
`{"prompt": ..., "response": ..., "task": ...}` (format `instruction`), or with `--chat`
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": ...}` (format `chat`).

    python scripts/make_instruction_data.py data/arith.jsonl --n 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from collections.abc import Callable

WORDS = ("apple banana cherry delta echo falcon garden harbor island jungle kettle lemon meadow "
         "nectar orange pepper quartz river silver tiger umbrella violet walnut yellow zebra").split()


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return f"What is {a} + {b}?", str(a + b)


def _sub(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 999), r.randint(0, 999)
    return f"What is {a} - {b}?", str(a - b)


def _mul(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 99), r.randint(0, 99)
    return f"Multiply {a} by {b}.", str(a * b)


def _reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"Reverse the letters of the word '{w}'.", w[::-1]


def _upper(r: random.Random) -> tuple[str, str]:
    ws = " ".join(r.sample(WORDS, r.randint(2, 4)))
    return f"Write in capital letters: {ws}", ws.upper()


def _count(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    c = r.choice(sorted(set(w)))
    return f"How many times does the letter '{c}' appear in '{w}'?", str(w.count(c))


def _sort(r: random.Random) -> tuple[str, str]:
    xs = [r.randint(0, 99) for _ in range(r.randint(3, 7))]
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}", \
        ", ".join(map(str, sorted(xs)))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "reverse": _reverse, "upper": _upper, "count": _count,
    "sort": _sort,
}


def make_records(n: int, seed: int = 0, chat: bool = False) -> list[dict]:
    """`n` records, deterministic in `seed`, tasks drawn uniformly from `TASKS`."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        task = r.choice(sorted(TASKS))
        prompt, response = TASKS[task](r)
        if chat:
            out.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}], "task": task})
        else:
            out.append({"prompt": prompt, "response": response, "task": task})
    return out


def main() -> None:
    """Write the dataset to the path given on the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path, help="output .jsonl path")
    ap.add_argument("--n", type=int, default=2000, help="number of records (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="write chat `messages` records instead")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as fh:
        for rec in make_records(a.n, a.seed, a.chat):
            fh.write(json.dumps(rec) + "\n")
    print(f"wrote {a.n} records to {a.out}")


if __name__ == "__main__":
    main()
