"""Check a Detectron2 config and every ``_BASE_`` it names before Detectron2 reads them.

Detectron2's ``CfgNode.merge_from_file`` defaults to ``allow_unsafe=True``: a config that safe
YAML loading refuses is then read with ``yaml.unsafe_load``, so ``!!python/object/apply:
os.system [...]`` in a config (or in a ``_BASE_`` it points to) runs code. This module walks the
chain itself, composing each file into YAML nodes (composing constructs nothing, so it runs
nothing), and refuses

- any tag that safe loading does not know (``!!python/...`` and custom tags), unless the user
  passes ``--unsafe-load`` for a file they trust;
- a document that would expand beyond :data:`MAX_NODES` nodes: aliases are shared when loaded,
  but Detectron2 copies every mapping into a ``CfgNode``, so a few hundred bytes of nested
  aliases (an "alias bomb") cost minutes and gigabytes;
- a ``_BASE_`` chain that loops or is deeper than :data:`MAX_DEPTH`, files over
  :data:`MAX_BYTES`, and nesting too deep for the parser.

Errors name the file and never print a value of the document.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import TransferError

MAX_NODES = 100_000   # Detectron2's full default config is about 1,000
MAX_BYTES = 1 << 20
MAX_DEPTH = 16
SAFE_TAG_PREFIX = "tag:yaml.org,2002:"
#: The tags ``yaml.SafeLoader`` constructs; everything else needs the unsafe loader.
SAFE_TAGS = {SAFE_TAG_PREFIX + t for t in ("null", "bool", "int", "float", "binary",
                                           "timestamp", "omap", "pairs", "set", "str", "seq",
                                           "map", "merge", "value")}


def check_config_chain(path: str | os.PathLike[str], unsafe_load: bool = False) -> None:
    """Raise :class:`TransferError` naming the file unless ``path`` and its ``_BASE_`` chain are
    safe to hand to Detectron2."""
    chain: list[Path] = []
    current: Path | None = Path(path)
    while current is not None:
        resolved = current.resolve()
        if resolved in chain:
            raise TransferError(current, "_BASE_ chain loops back to this file")
        if len(chain) >= MAX_DEPTH:
            raise TransferError(current, f"_BASE_ chain is deeper than {MAX_DEPTH} files")
        chain.append(resolved)
        current = _check_file(current, unsafe_load)


def _check_file(path: Path, unsafe_load: bool) -> Path | None:
    """Check one file; return the ``_BASE_`` it names (resolved as Detectron2 does), if any."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise TransferError(path, "config is not a regular file")
        if size > MAX_BYTES:
            raise TransferError(path, f"config is {size} bytes; a Detectron2 config is a few "
                                      f"kilobytes (limit {MAX_BYTES})")
        text = path.read_text()
    except FileNotFoundError:
        raise TransferError(path, "config file not found") from None
    except UnicodeDecodeError:
        raise TransferError(path, "config is not UTF-8 text") from None
    except OSError as err:
        raise TransferError(path, f"cannot read the config ({err.strerror or err})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise TransferError(path, "YAML is nested too deeply") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = " ".join(str(getattr(err, "problem", None) or err).split())  # one line
        raise TransferError(path, f"not valid YAML{at}: {what}") from None
    if root is None:
        return None
    try:
        size = _expanded_size(root, {}, path, unsafe_load)
    except RecursionError:
        raise TransferError(path, "YAML is nested too deeply") from None
    if size > MAX_NODES:
        raise TransferError(path, f"YAML expands to more than {MAX_NODES} values through its "
                                  f"aliases; refused (a config this large is not a config)")
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "_BASE_":
                if not isinstance(value, yaml.ScalarNode) or not value.value:
                    raise TransferError(path, "_BASE_ must be the path of another config")
                return _base_path(path, value.value)
    return None


def _base_path(path: Path, base: str) -> Path:
    """Where Detectron2's ``load_yaml_with_base`` looks for ``base``; it must be a file."""
    if "\x00" in base or len(base) > 4096:
        raise TransferError(path, "_BASE_ is not a file name")
    if "://" in base:
        raise TransferError(path, f"_BASE_ {base.split('://')[0][:20]}://... is a URL; configs "
                                  f"are read from local files only")
    if base.startswith("~"):
        found = Path(base).expanduser()
    else:
        found = Path(base) if os.path.isabs(base) else path.parent / base
    if not found.is_file():
        raise TransferError(path, f"its _BASE_ {found} is not a config file")
    return found


def _expanded_size(node: yaml.Node, memo: dict[int, int], path: Path, unsafe_load: bool) -> int:
    """Values ``node`` expands to when every alias is copied (memoised: linear in the nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if not unsafe_load and node.tag not in SAFE_TAGS:
        tag = node.tag.replace(SAFE_TAG_PREFIX, "!!")
        raise TransferError(path, f"uses the YAML tag {tag[:80]}, which safe loading refuses "
                                  f"(it can run code); if you trust the file, pass --unsafe-load")
    memo[key] = MAX_NODES + 1  # a node reached again while being sized: a recursive alias
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo, path, unsafe_load)
        if total > MAX_NODES:
            break
    memo[key] = total
    return total
