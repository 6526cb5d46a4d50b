"""The typefaces split's construction and counts (docs/DATASETS.md): per split seed, the
classes per split, what each rule removed, the script groups of each split with their kept
counts, and which split each script group went to. Deterministic (no training); ~1 minute.

    .venv/bin/python benchmarks/typefaces_split.py --seeds 0 1 2

Writes ``benchmarks/results/typefaces_split.json``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/typefaces_split.json")
    args = parser.parse_args()
    from metaserve.workers.tasks import typeface_split
    from metaserve.workers.tasks.typefaces import SELECTION_SIZE, render_all, split_characters

    characters = render_all(SELECTION_SIZE)[0]
    output = {"command": "benchmarks/typefaces_split.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
              "unicode_version": typeface_split.UNICODE_VERSION, "characters_rendered": len(characters),
              "duplicate_cosine": typeface_split.DUPLICATE_COSINE,
              "max_group_share": typeface_split.MAX_GROUP_SHARE, "split_fractions": typeface_split.SPLIT_FRACTIONS,
              "split_seeds": {}}
    for seed in args.seeds:
        report = split_characters(seed)
        output["split_seeds"][str(seed)] = {
            "counts": report.counts(), "removed": report.removed,
            "max_script_share": {split: round(max(report.group_counts[split].values()) / len(report.splits[split]), 3)
                                 for split in ("val", "test")},
            "script_groups": report.group_counts, "assignment": report.groups,
            "characters": {split: "".join(characters[i] for i in ids) for split, ids in report.splits.items()}}
        print(seed, report.counts(), report.removed, file=sys.stderr)
    args.out.write_text(json.dumps(output, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
