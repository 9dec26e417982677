"""Repository-level promises: the README's quick start and the CI entry point."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    for inc in re.findall(r"^-?include\s+(\S+)", text, flags=re.M):
        if (ROOT / inc).is_file():
            text += (ROOT / inc).read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, flags=re.M))


def test_readme_quick_start_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*make ([\w-]+)\s*$", readme, flags=re.M)
    assert "demo" in commands and "test" in commands, "README quick start must show `make demo` and `make test`"
    targets = _make_targets()
    for cmd in commands:
        assert cmd in targets, f"README mentions `make {cmd}` but the Makefile has no such target"


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\s*$", ci, flags=re.M)


def test_make_dry_run_knows_both_targets():
    for target in ("demo", "test"):
        r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def _relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold commands, not links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [l.split("#", 1)[0] for l in links if not re.match(r"[a-z]+:", l) and not l.startswith("#")]


def test_markdown_links_resolve():
    """A moved or renamed record must not leave the README or the docs pointing at nothing."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks" / "results").rglob("*.md"))]
    broken = [f"{md.relative_to(ROOT)}: {link}" for md in pages for link in _relative_links(md)
              if not (md.parent / link).exists()]
    assert not broken, "links to missing files:\n" + "\n".join(broken)
