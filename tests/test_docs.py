"""The documentation states what the code does: the results are the generator's output byte for byte,
every `python train.py ...` command shown composes with the real config, and every link resolves."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from prune_lab.errors import PruneLabError
from prune_lab.results_summary import END, START, load_all, readme_block, results_page

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# the words a comparison may not use unless it is one of the verdicts (see prune_lab/verdicts.py)
FORBIDDEN = re.compile(r"\b(holds|contradicted|as accurate as|as good as|matches|equal to|brings nothing)\b", re.I)


def test_results_block_and_page_are_the_generators_output():
    studies = load_all(ROOT)
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(START):readme.index(END) + len(END)]
    assert block == readme_block(studies), "README results block is stale: python scripts/study.py --summary"
    assert (ROOT / "docs" / "results.md").read_text() == results_page(studies), \
        "docs/results.md is stale: python scripts/study.py --summary"


def test_quick_start_tables_are_the_committed_runs_rendered():
    """The printed tables in README and the quick-start page come from docs/quickstart/*.json, and
    every committed run is shown somewhere (a table cannot drift from the JSON holding its machine)."""
    from prune_lab.report import QUICKSTART_END, quickstart_blocks

    shown = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "get-started" / "quickstart.md"):
        text = page.read_text()
        assert text.count(QUICKSTART_END) >= 1, f"{page.name} shows no quick-start table"
        assert text == quickstart_blocks(text, ROOT), f"{page.name} is stale: python scripts/quickstart_docs.py"
        shown |= set(re.findall(r"QUICKSTART:([\w.]+):START", text))
    assert shown == {p.stem for p in (ROOT / "docs" / "quickstart").glob("*.json")}


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


def test_every_study_table_is_in_the_site_navigation():
    """A study a reader cannot find in the site's menu is evidence nobody reads; claimless studies
    (selections, probes) sit in their own section so they are not mistaken for verdicts."""
    nav = (ROOT / "mkdocs.yml").read_text()
    tables = sorted((ROOT / "docs" / "studies").glob("*/table.md"))
    missing = [t.parent.name for t in tables if f"studies/{t.parent.name}/table.md" not in nav]
    assert not missing, f"add to mkdocs.yml nav (Results): {missing}"
    selections = nav[nav.index("Selections and probes"):nav.index("  - Performance:")]
    for t in tables:
        has_claims = "| claim |" in t.read_text()
        assert (f"studies/{t.parent.name}/table.md" in selections) != has_claims, t.parent.name


def test_no_comparison_outside_the_verdict_vocabulary():
    hits = []
    for page in PAGES:
        if "studies" in page.parts:  # generated tables: claim texts are built from the vocabulary
            continue
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        yield target.split("#", 1)[0]


def test_every_relative_link_resolves_inside_the_repository():
    missing = []
    for page in PAGES:
        for target in _links(page):
            path = (page.parent / target).resolve()
            if not path.exists() or ROOT not in path.parents and path != ROOT:
                missing.append(f"{page.relative_to(ROOT)} → {target}")
    assert not missing, "\n".join(missing)


def shown_commands() -> list[tuple[str, list[str]]]:
    """Every `python train.py ...` command in README and docs (continuation lines joined), as argv."""
    out = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().strip("`")
            if line.startswith("$ "):  # an error example: bad on purpose (tests/test_pipeline.py checks them)
                continue
            m = re.search(r"python3? train\.py(.*)", line)
            if not m:
                continue
            rest = m.group(1).split("`")[0].split(" #")[0]
            if "..." in rest or "<" in rest:  # a pattern, not a command
                continue
            argv = [a for a in shlex.split(rest) if a != "-m"]
            out.append((f"{page.relative_to(ROOT)}: python train.py{rest}", argv))
    return out


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """The README's own `my_models.py`, so that the command importing it composes and validates."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"# my_models\.py[^\n]*\n(.*?)\n\s*python train\.py imports", readme, re.S)
    assert code, "README's my_models.py example is gone"
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_models.py").write_text("\n".join(line[6:] for line in code.group(1).splitlines()) + "\n")
    return folder


def test_the_readmes_own_model_registers_and_builds(user_module, monkeypatch):
    from omegaconf import OmegaConf

    from prune_lab.checks import import_user_modules
    from prune_lab.models import create_model

    monkeypatch.chdir(user_module)
    import_user_modules(OmegaConf.create({"imports": ["my_models"]}))
    import torch

    assert create_model("mynet", num_classes=10, in_channels=1)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_every_shown_command_composes_and_validates(user_module, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from prune_lab.checks import validate
    from prune_lab.cli import unknown_option

    commands = shown_commands()
    assert len(commands) >= 10
    monkeypatch.chdir(user_module)
    for where, argv in commands:
        # a sweep's values a,b,c: each composes the same way, the first stands for them
        argv = [a if "[" in a or "=" not in a else a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0]
                for a in argv]
        for a in argv:
            assert unknown_option(a) is None, f"{where}: {unknown_option(a)}"
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="train", overrides=argv, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - the message names the override
            pytest.fail(f"{where}: {str(e).splitlines()[0]}")
        finally:
            GlobalHydra.instance().clear()
        try:
            validate(cfg)
        except PruneLabError as e:  # a GPU recipe shown in the docs, checked here on a machine without one
            assert "no GPU is available here" in str(e), f"{where}: {e}"
