"""The user's documentation stays usable: README.md is a short guide, every relative link in it and
in docs/*.md resolves (file and #anchor), and every command the docs show names a real subcommand
with options it accepts."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from spaceevo.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 160
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*~]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    found: set[str] = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in HEADING.findall(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_the_stage_pages_exist_and_the_readme_links_each():
    links = {t.split("#")[0] for t in relative_links(README)}
    for page in ("latency", "search", "training", "extraction", "export", "RESULTS"):
        assert (ROOT / "docs" / f"{page}.md").is_file()
        assert f"docs/{page}.md" in links, f"README.md does not link docs/{page}.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(dict.fromkeys(broken))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every leaf command by its words, e.g. ``{"latency build": …, "run": …}``."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                deeper = subcommands(sub)
                found.update({f"{name} {k}": v for k, v in deeper.items()} if deeper else {name: sub})
    return found


def documented_commands(path: Path) -> list[str]:
    """``spaceevo …`` command lines in fenced blocks (continuations joined) and in table rows."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("spaceevo "):
                commands.append(line)
    for line in text.splitlines():
        cells = re.split(r"(?<!\\)\|", line)
        if line.startswith("|") and len(cells) > 2 and cells[1].strip().startswith("`spaceevo "):
            commands.append(" ".join(INLINE_CODE.findall(cells[1])).replace("`", ""))
    return commands


def test_documented_commands_exist_with_their_options():
    commands = subcommands(build_parser())
    readme = README.read_text()
    missing = [name for name in commands if f"spaceevo {name}" not in readme]
    assert not missing, f"README.md's command table lacks: {', '.join(missing)}"
    wrong = []
    for page in PAGES:
        for line in documented_commands(page):
            words = shlex.split(line.replace("\\|", "|").replace("'", "").replace('"', ""))[1:]
            name = next((n for n in sorted(commands, key=len, reverse=True) if words[: len(n.split())] == n.split()), None)
            if name is None:
                wrong.append(f"{page.name}: unknown command in '{line}'")
                continue
            accepted = {o for a in commands[name]._actions for o in a.option_strings}
            for option in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line):
                if option not in accepted:
                    wrong.append(f"{page.name}: 'spaceevo {name}' has no option {option}")
    assert not wrong, "\n".join(wrong)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_examples_call_the_api_with_arguments_it_accepts(page) -> None:
    """Every ``spaceevo.NAME(...)`` / ``spaceevo.latency.NAME(...)`` call in a Python example binds to
    the function's signature (names and keywords exist; nothing is run)."""
    import ast
    import inspect

    import spaceevo

    for block in python_blocks(page.read_text()):
        for node in ast.walk(ast.parse(block)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            path = ast.unparse(node.func).split(".")
            if path[0] != "spaceevo":
                continue
            target = spaceevo
            for name in path[1:]:
                target = getattr(target, name)
            args = [None] * len(node.args)
            kwargs = {k.arg: None for k in node.keywords if k.arg}
            inspect.signature(target).bind(*args, **kwargs)  # TypeError names what does not fit
