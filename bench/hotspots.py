"""Top hotspots from a py-spy collapsed-stack file (``py-spy record --format raw``).

    python bench/hotspots.py profile.txt [--top 25] [--match gateway/]

Prints the frames with the most samples on top of the stack (self), by file:line and by
function, and the functions with the most samples anywhere on the stack (inclusive).
``--match`` restricts the inclusive table to frames whose file contains the string.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse(frame: str) -> tuple[str, str, str]:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?", ""
    return match["func"], short(match["file"]), match["line"] or ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="")
    args = p.parse_args(argv)
    self_line: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in args.profile.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [parse(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        func, file, line = frames[-1]
        self_line[f"{file}:{line} {func}"] += n
        self_func[f"{file} {func}"] += n
        seen = set()
        for func, file, _line in frames:
            key = f"{file} {func}"
            if key not in seen and args.match in file:
                seen.add(key)
                inclusive[key] += n
    print(f"{total} samples")
    for title, counter in (("self, by line", self_line), ("self, by function", self_func),
                           ("inclusive, by function", inclusive)):
        print(f"\n{title}:")
        for key, n in counter.most_common(args.top):
            print(f"  {100 * n / max(total, 1):5.1f}%  {n:6d}  {key}")


if __name__ == "__main__":
    main()
