"""The README and docs/ stay true: the field reference matches the spec models, the two
commands exist, the README stays a short map, and the paths and links it names exist."""

import re
from pathlib import Path

from llm_dist.spec import reference

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
SPEC_DOC = (ROOT / "docs" / "spec.md").read_text()
MAX_README_LINES = 260


def _section(text: str, heading: str) -> str:
    assert f"\n## {heading}\n" in text, f"README lost its section '## {heading}'"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_field_reference_matches_the_models():
    block = re.search(r"<!-- reference:start -->\n(.*)<!-- reference:end -->", SPEC_DOC, re.S)
    assert block, "docs/spec.md lost its reference markers"
    assert block.group(1) == reference(), (
        "docs/spec.md field reference is stale: replace what lies between its reference "
        "markers with the output of `python -m llm_dist.spec`"
    )


def test_exactly_two_setup_commands_and_they_exist():
    section = README.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make quickstart", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("quickstart", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_short_map():
    lines = len(README.splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines, over {MAX_README_LINES}: move detail into docs/"
    )


def _looks_like_a_path(span: str) -> bool:
    if re.search(r"\s", span) or "://" in span:
        return False
    return "/" in span or span.endswith((".py", ".md", ".yaml"))


def test_every_path_in_the_file_map_exists():
    section = _section(README, "Files")
    spans = re.findall(r"`([^`\n]+)`", section)
    entries = re.findall(r"^- `([^`\n]+)`", section, re.M)  # each line's file, e.g. Makefile
    paths = sorted({span for span in spans if _looks_like_a_path(span)} | set(entries))
    assert paths, "the README's file map names no paths"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's file map names paths that do not exist: {missing}"


def test_every_docs_link_in_the_readme_exists():
    links = re.findall(r"\]\((docs/[^)#\s]*)", README)
    assert links, "the README links to no docs/ page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"the README links to docs/ files that do not exist: {missing}"


def test_every_relative_link_in_docs_exists():
    for page in sorted((ROOT / "docs").glob("*.md")):
        links = re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text())
        missing = [link for link in links if not (page.parent / link).exists()]
        assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"
