"""The README stays true: its field reference matches the spec models, its two commands exist."""

import re
from pathlib import Path

from llm_dist.spec import reference

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_field_reference_matches_the_models():
    block = re.search(r"<!-- reference:start -->\n(.*)<!-- reference:end -->", README, re.S)
    assert block, "README lost its reference markers"
    assert block.group(1) == reference(), (
        "README field reference is stale: replace it with the output of `python -m llm_dist.spec`"
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
