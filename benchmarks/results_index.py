"""The machine table of benchmarks/results/: one row per results file with the machine it ran on (older files
predate the machine label: it is rebuilt from their environment record), for README.md's performance section.

    .venv/bin/python benchmarks/results_index.py        # prints the markdown table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_label, md_table  # noqa: E402


def rows(folder: Path = RESULTS) -> list[list[str]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        env = data.get("environment") or {}
        label = env.get("machine_label") or (machine_label(env) if env else data.get("machine", "not recorded"))
        out.append([f"[{path.stem}](benchmarks/results/{path.stem}.md)", label, str(env.get("date", ""))[:16]])
    return out


if __name__ == "__main__":
    print(md_table(["results", "machine", "date"], rows()))
