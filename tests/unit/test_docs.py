"""The project stands alone: no doc, comment or config names files users lack."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Everything a user reads: docs, code and its comments, tests, the compose stack's configs.
SOURCES = [
    path
    for folder in ("nexus_bus", "handlers", "schemas", "tests", "benchmarks", "compose")
    for path in sorted((ROOT / folder).rglob("*"))
    if path.is_file() and path.suffix in {".py", ".md", ".conf", ".yml", ".yaml", ".json", ".js"}
    and path != Path(__file__).resolve()
]
OUTSIDE = re.compile(r"\.\./shared/\S*|\b(?:DESIGN|TRAPS|STYLE)\.md\b")


def test_no_file_names_a_file_outside_the_repository() -> None:
    outside = [
        f"{path.relative_to(ROOT)}: {hit}"
        for path in [*DOCS, ROOT / "Makefile", *SOURCES]
        for hit in OUTSIDE.findall(path.read_text(errors="replace"))
    ]
    assert outside == []


def test_relative_links_point_at_files_that_exist() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.name}: {target}")
    assert broken == []
