"""Summarise a sweep: python scripts/summarize.py outputs/sweeps/<id>   (writes summary.md,
summary.csv and pareto.png into the sweep directory and prints the table)."""
import argparse
import sys
from pathlib import Path

from prune_lab.sweep import summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory {args.sweep_dir} does not exist", file=sys.stderr)
        return 2
    rows, missing, text = summarize(args.sweep_dir)
    print(text)
    print(f"wrote {args.sweep_dir / 'summary.md'}, summary.csv" + (", pareto.png" if rows else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
