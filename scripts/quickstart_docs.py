"""The quick start's printed tables in README.md and docs/get-started/quickstart.md, rendered from the
committed docs/quickstart/<name>.json (a run's results.json: numbers, machine, CPU kind and date).

    python scripts/quickstart_docs.py                     # re-render the tables from the committed JSONs
    python scripts/quickstart_docs.py --take outputs/runs/<date>/<time>_magnitude_0.9 outputs/runs/<date>/<time>_l1_filter_0.5
                                                          # commit those runs' results.json first (named <method>_<budget>)

The runs are `python train.py experiment=quickstart method=magnitude budget=0.9` and
`python train.py experiment=quickstart method=l1_filter budget=0.5`, on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prune_lab.report import quickstart_blocks  # noqa: E402

PAGES = [ROOT / "README.md", ROOT / "docs" / "get-started" / "quickstart.md"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--take", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="run directories whose results.json become docs/quickstart/<method>_<budget>.json")
    args = parser.parse_args()
    for run in args.take:
        results = json.loads((run / "results.json").read_text())
        dest = ROOT / "docs" / "quickstart" / f"{results['method']}_{results['budget']:g}.json"
        shutil.copyfile(run / "results.json", dest)
        print(f"{run / 'results.json'} -> {dest.relative_to(ROOT)}")
    for page in PAGES:
        page.write_text(quickstart_blocks(page.read_text(), ROOT))
        print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
