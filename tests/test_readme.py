"""The README is a map: short, every command in it runs (or at least parses with the CLI it names), every page it
links to exists. Its one transcript, the stage table, is checked number by number in test_readme_numbers.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from v3kit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAX_LINES = 300


def _bash_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()  # a trailing comment
            if line:
                lines.append(line)
    return lines


def test_readme_is_a_map():
    assert len(README.splitlines()) <= MAX_LINES


@pytest.mark.parametrize("line", [ln for ln in _bash_lines() if ln.startswith("v3kit ")])
def test_every_v3kit_command_parses(line):
    argv = shlex.split(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on an unknown command, flag or choice
        pytest.fail(f"README command does not parse ({e}): {line}")
    assert callable(args.func)


def test_every_other_command_names_something_that_exists():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for line in _bash_lines():
        words = shlex.split(line)
        if words[0] == "make":
            assert words[1] in targets, line
        elif words[0] == "python":
            assert (ROOT / words[1]).is_file(), line
        else:
            assert words[0] == "v3kit", f"a README command this test does not know how to check: {line}"


def test_every_linked_page_exists():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith("http")]
    assert local, "the README links to its docs"
    for link in local:
        assert (ROOT / link).exists(), link
