"""Print `make mutants`' score per module from mutmut's results: mutants, killed, survived, score.

A timeout counts as killed (the mutant made the tests hang, and they noticed). Survivors are listed by
id; each one must be in mutation/MUTANTS.md as equivalent, with the reason. Exit status 1 when a module
scores under the goal or a survivor is not listed there.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

GOAL = 90.0
LISTED = Path(__file__).with_name("MUTANTS.md")
MUTMUT = str(Path(sys.executable).with_name("mutmut"))


def main() -> int:
    lines = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors: dict[str, list[str]] = collections.defaultdict(list)
    for line in filter(None, (raw.strip() for raw in lines.splitlines())):
        name, _, status = line.rpartition(": ")
        module = re.split(r"\.x[ǁ_]", name)[0]
        counts[module][status] += 1
        if status not in ("killed", "timeout"):
            survivors[module].append(f"{name} ({status})")
    print("| module | mutants | killed | score |\n| --- | --- | --- | --- |")
    low = False
    for module, c in sorted(counts.items()):
        total, killed = sum(c.values()), c["killed"] + c["timeout"]
        score = 100 * killed / total
        low |= score < GOAL
        print(f"| `{module}` | {total} | {killed} | {score:.0f}% |")
    listed = LISTED.read_text(encoding="utf-8")
    unlisted = []
    for module, names in sorted(survivors.items()):
        print(f"\n{module}: {len(names)} not killed")
        for name in names:
            known = f"`{name.split(' ')[0]}`" in listed
            unlisted += [] if known else [name]
            print(f"  {name}" + ("" if known else "  <- not in mutation/MUTANTS.md"))
    return 1 if low or unlisted else 0


if __name__ == "__main__":
    sys.exit(main())
