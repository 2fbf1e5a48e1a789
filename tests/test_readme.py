"""Every command README.md and docs/*.md show names a real entry point, real flags and a
shipped config; every relative link points at a file (and heading) that exists; the module
map of docs/architecture.md matches the tree.

The demo and the tests run the small-scale commands for real; the cluster-scale ones
(ImageNet, COCO on 8 GPUs) are checked here by parsing them with the very argument parsers
the console scripts use.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)


def commands_of(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments dropped."""
    commands = []
    for lang, block in FENCE.findall(text):
        if lang != "bash":
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


COMMANDS = commands_of(README)
DOC_COMMANDS = [(rel(doc), command) for doc in DOCS for command in commands_of(doc.read_text())]


def parse(parser_module: str, args: list[str]):
    module = __import__(parser_module, fromlist=["build_parser"])
    try:
        return module.build_parser().parse_args(args)
    except SystemExit as exc:  # argparse rejects unknown flags with exit 2
        raise AssertionError(f"{parser_module} rejects {args}") from exc


def check_pretrain(args: list[str]) -> None:
    from pretrain.__main__ import resolve_config_path
    from pretrain.config import load_config

    ns = parse("pretrain.__main__", args)
    if getattr(ns, "config", None):
        load_config(resolve_config_path(ns.config), [o for o in ns.overrides if "=" in o])


def check_transfer(args: list[str]) -> None:
    ns = parse("transfer.__main__", args)
    if getattr(ns, "config", None):
        from transfer.config import resolve_config

        assert resolve_config(ns.config).is_file()


def check_script(words: list[str]) -> None:
    """``python SCRIPT.py --flag ...``: the script exists and defines every flag shown."""
    script = REPO / words[1]
    assert script.is_file(), f"no such script: {words[1]}"
    source = script.read_text()
    for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        assert f'"{flag}"' in source or f"'{flag}'" in source, f"{words[1]} has no {flag}"


def check(command: str) -> str:
    words = shlex.split(command)
    head = Path(words[0]).name
    if head == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert words[1] in targets, f"no make target {words[1]}"
        return "make"
    if head == "torchrun":
        i = words.index("-m")
        assert words[i + 1] == "pretrain"
        check_pretrain(words[i + 2:])
        return "pretrain"
    if head == "m2t-pretrain":
        check_pretrain(words[1:])
        return "pretrain"
    if head == "m2t-convert":
        parse("convert.__main__", words[1:])
        return "convert"
    if head == "m2t-transfer":
        check_transfer(words[1:])
        return "transfer"
    if head in ("python", "python3") and words[1:3] == ["-m", "pip"]:
        return "pip"
    if head in ("python", "python3") and words[1:3] == ["-m", "venv"]:
        return "venv"
    if head in ("python", "python3") and words[1:3] == ["-m", "pytest"]:
        for path in (w for w in words[3:] if not w.startswith("-")):
            assert (REPO / path.split("::")[0]).exists(), f"no test path {path}"
        return "pytest"
    if head in ("python", "python3") and words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
        return "module"
    if head in ("python", "python3") and words[1].endswith(".py"):
        check_script(words)
        return "script"
    if head == "export":
        return "env"
    raise AssertionError(f"command not understood by this test: {command}")


@pytest.mark.parametrize(("doc", "command"), DOC_COMMANDS,
                         ids=[f"{d}:{c[:60]}" for d, c in DOC_COMMANDS])
def test_documented_command_is_real(doc: str, command: str) -> None:
    check(command)


def test_every_doc_page_shows_commands_only_in_checked_blocks() -> None:
    """Shell commands go in ```bash blocks, the ones this test checks; output goes in plain
    ``` blocks. A ```sh or ```console block would escape the check."""
    for doc in DOCS:
        langs = {lang for lang, _ in FENCE.findall(doc.read_text())}
        assert not langs & {"sh", "shell", "console", "zsh"}, f"{rel(doc)}: {langs}"


def test_readme_shows_every_stage_and_no_placeholder_is_left() -> None:
    kinds = {check(c) for c in COMMANDS}
    assert {"make", "pretrain", "convert", "transfer"} <= kinds
    assert COMMANDS[:2] == ["make demo", "make test"]
    for placeholder in ("DEMO_TABLE", "DEMO_MINUTES", "PRETRAIN_SAMPLE", "STUDY_SECTION"):
        assert placeholder not in README, f"README still holds {placeholder}"


def test_readme_is_short() -> None:
    """The README is the entry point; the guides are in docs/."""
    assert len(README.splitlines()) <= 220


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


# --- links --------------------------------------------------------------------------------------

def without_code(text: str) -> str:
    """``text`` without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text()),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links_of(doc: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", without_code(doc.read_text()))


LINKS = [(rel(doc), link) for doc in DOCS for link in links_of(doc)
         if not re.match(r"[a-z]+:", link)]


def test_the_docs_link_to_each_other() -> None:
    assert any(link.startswith("docs/") for doc, link in LINKS if doc == "README.md")
    assert ("README.md", "docs/reliability.md") in LINKS


@pytest.mark.parametrize(("doc", "link"), LINKS, ids=[f"{d}:{link}" for d, link in LINKS])
def test_relative_link_points_at_an_existing_file_and_heading(doc: str, link: str) -> None:
    target, _, anchor = link.partition("#")
    path = (REPO / doc).parent / target if target else REPO / doc
    assert path.exists(), f"{doc}: {link}: no such file {path}"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path), f"{doc}: {link}: no heading #{anchor} in {rel(path)}"


# --- the module map -----------------------------------------------------------------------------

def installed_packages() -> list[str]:
    """The top-level packages ``pyproject.toml`` installs (``include = ["pretrain*", ...]``)."""
    text = (REPO / "pyproject.toml").read_text()
    include = re.search(r"^include\s*=\s*\[(.*?)\]", text, flags=re.M | re.S).group(1)
    return [p.rstrip("*") for p in re.findall(r'"([^"]+)"', include)]


def modules_in_tree() -> set[str]:
    """Every module of the installed packages (``__init__.py`` aside), and every subpackage
    as ``pkg/sub/``."""
    found = set()
    for package in installed_packages():
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).parts
            if "__pycache__" in parts or "configs" in parts:
                continue
            if path.name == "__init__.py":
                if path.parent != REPO / package:
                    found.add(rel(path.parent) + "/")
            else:
                found.add(rel(path))
    return found


def modules_in_map() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("\n## Module map"):]
    section = section[:section.index("\n## ", 1)]
    return set(re.findall(r"^\|\s*`([^`]+)`\s*\|", section, flags=re.M))


def test_architecture_module_map_matches_the_tree() -> None:
    tree, documented = modules_in_tree(), modules_in_map()
    assert installed_packages() and tree
    missing, stale = sorted(tree - documented), sorted(documented - tree)
    assert not missing and not stale, (
        f"docs/architecture.md's module map is out of date: add rows for {missing}, "
        f"remove or rename {stale}")
