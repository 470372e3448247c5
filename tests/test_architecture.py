"""docs/ARCHITECTURE.md's map names every module of the package, and only modules that
exist: a new file without a line in the map, or a line for a file that is gone, fails here.
README and results.py point to the map."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAP = REPO / "docs" / "ARCHITECTURE.md"


def map_section(text: str) -> str:
    start, end = text.index("<!-- map"), text.index("<!-- /map -->")
    return text[start:end]


def named_in_map(text: str) -> set:
    return set(re.findall(r"^- `([\w/]+\.py)`:", map_section(text), re.M))


def modules() -> set:
    pkg = REPO / "finellama_rl"
    return {str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if p.name != "__init__.py"}


def test_map_parser_reads_one_line_per_module():
    text = "intro\n<!-- map -->\n- `a.py`: one\n- `job/b.py`: two\nnot `c.py`: prose\n<!-- /map -->\n- `d.py`: after"
    assert named_in_map(text) == {"a.py", "job/b.py"}


def test_the_map_names_every_module_and_only_existing_ones():
    named = named_in_map(MAP.read_text())
    assert sorted(modules() - named) == [], "modules missing from docs/ARCHITECTURE.md's map"
    assert sorted(named - modules()) == [], "the map names modules that do not exist"


def test_each_module_is_named_once():
    lines = re.findall(r"^- `([\w/]+\.py)`:", map_section(MAP.read_text()), re.M)
    assert len(lines) == len(set(lines))


def test_readme_results_and_log_point_to_the_map():
    for path in ("README.md", "finellama_rl/results.py", "docs/LOG.md"):
        assert "docs/ARCHITECTURE.md" in (REPO / path).read_text(), path
