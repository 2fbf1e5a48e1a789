"""Every command the README shows names a real entry point, real flags and a shipped config.

The demo and the tests run the small-scale commands for real; the cluster-scale ones
(ImageNet, COCO on 8 GPUs) are checked here by parsing them with the very argument parsers
the console scripts use.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


COMMANDS = readme_commands()


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
        return "pytest"
    if head in ("python", "python3") and words[1].endswith(".py"):
        assert (REPO / words[1]).is_file(), words[1]
        return "script"
    if head == "export":
        return "env"
    raise AssertionError(f"README command not understood by this test: {command}")


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_real(command: str) -> None:
    check(command)


def test_readme_shows_every_stage_and_no_placeholder_is_left() -> None:
    kinds = {check(c) for c in COMMANDS}
    assert {"make", "pretrain", "convert", "transfer"} <= kinds
    assert COMMANDS[:2] == ["make demo", "make test"]
    for placeholder in ("DEMO_TABLE", "DEMO_MINUTES", "PRETRAIN_SAMPLE", "STUDY_SECTION"):
        assert placeholder not in README, f"README still holds {placeholder}"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
