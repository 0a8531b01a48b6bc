"""The project's docs stand alone: no link leaves the repository for files users lack."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_name_no_file_outside_the_repository() -> None:
    outside = [
        f"{doc.name}: {hit}"
        for doc in DOCS
        for hit in re.findall(r"\.\./shared/\S*|\b(?:DESIGN|TRAPS|STYLE)\.md\b", doc.read_text())
    ]
    assert outside == []


def test_relative_links_point_at_files_that_exist() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.name}: {target}")
    assert broken == []
