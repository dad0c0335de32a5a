"""The README is a landing page and the manual builds: MkDocs in strict mode (a broken link,
anchor or a page missing from the nav fails), and every link of the README resolves."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import REPO


def test_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "{{" not in readme  # no placeholder left
    for heading in ("## Set-up: two commands", "## The pipeline", "## Leaderboard"):
        assert heading in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links and all((REPO / link).exists() for link in links if "://" not in link)


def test_the_manual_builds_strict(tmp_path):
    nav = yaml.safe_load((REPO / "docs/mkdocs.yml").read_text())["nav"]
    pages = sorted(p.name for p in (REPO / "docs/pages").glob("*.md"))
    assert sorted(next(iter(e.values())) for e in nav) == pages  # every page in the nav
    out = tmp_path / "site"
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "index.html").is_file() and (out / "performance" / "index.html").is_file()
    for page in (REPO / "docs/pages").glob("*.md"):
        assert "{{" not in page.read_text(), f"{page.name} has a placeholder left"


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is a real check: a link to a missing page fails it."""
    docs = tmp_path / "docs"
    (docs / "pages").mkdir(parents=True)
    (docs / "mkdocs.yml").write_text((REPO / "docs/mkdocs.yml").read_text())
    for page in (REPO / "docs/pages").glob("*.md"):
        (docs / "pages" / page.name).write_text(page.read_text())
    index = docs / "pages" / "index.md"
    index.write_text(index.read_text() + "\nSee [nowhere](missing.md).\n")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run(
        [
            str(mkdocs),
            "build",
            "--strict",
            "-f",
            str(docs / "mkdocs.yml"),
            "-d",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "missing.md" in proc.stderr
