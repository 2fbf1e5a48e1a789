"""What a file given as a checkpoint is, when it is not one, told from its first bytes.

``torch.save`` writes a ZIP archive holding ``<name>/data.pkl`` (or, before PyTorch 1.6, a
protocol-2 pickle starting with a magic number). Anything else is named by kind, so that the
error says what the user actually gave (an empty download, a JSON file renamed ``.pth``, a
Detectron2 ``.pkl``, a DeepMind BYOL JAX pickle, a TorchScript archive) and what to do about
it. A safetensors file is recognised here too, and read (``io``).
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from typing import IO

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save before 1.6: pickle protocol 2 + magic number
HEAD_BYTES = 64

#: (leading bytes, what a file starting with them is).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip-compressed file; decompress it (gunzip) and convert the result"),
    (b"\x89HDF", "an HDF5 file (Keras / TensorFlow weights?), not a PyTorch checkpoint"),
    (b"\x93NUMPY", "a NumPy .npy array, not a PyTorch checkpoint"),
    (b"\x89PNG", "a PNG image, not a checkpoint"),
    (b"\xff\xd8\xff", "a JPEG image, not a checkpoint"),
    (b"%PDF", "a PDF document, not a checkpoint"),
)


def is_checkpoint_head(head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC) or head.startswith(LEGACY_MAGIC)


def non_checkpoint_kind(head: bytes) -> str:
    """Why a file starting with ``head`` (``HEAD_BYTES`` of it) is not a torch.save file."""
    if not head:
        return ("is empty (0 bytes): not a checkpoint; was a download or copy interrupted? "
                "Fetch the file again")
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return f"is {kind}"
    if is_pickle(head):
        return pickle_kind(head)
    if is_safetensors(head):
        return "is a safetensors file (read with the safetensors package)"
    text = _as_text(head)
    if text is not None:
        stripped = text.lstrip()
        if stripped[:1] in ("{", "["):
            return "is a JSON file, not a PyTorch checkpoint (expected a file written by torch.save)"
        if stripped[:1] == "<":
            return ("is an HTML or XML page, not a PyTorch checkpoint (a download that "
                    "returned a web page instead of the file?)")
        return "is a text file, not a PyTorch checkpoint (expected a file written by torch.save)"
    return "is not a PyTorch checkpoint (expected a file written by torch.save)"


def zip_kind(f: IO[bytes]) -> str | None:
    """Why a ZIP archive is not a torch.save checkpoint, or None if it may be one.

    A checkpoint has a ``data.pkl`` one folder down and no TorchScript ``code/``; a damaged
    archive (truncated, bit-flipped) returns None, for ``torch.load`` to report.
    """
    try:
        names = zipfile.ZipFile(f).namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return None
    finally:
        f.seek(0)
    if any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in names):
        return ("is a TorchScript archive (torch.jit.save), not a checkpoint; load it with "
                "torch.jit.load, then torch.save its state_dict() and convert that")
    if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
        return None
    if names and all(n.endswith(".npy") for n in names):
        return "is a NumPy .npz archive, not a PyTorch checkpoint"
    return ("is a ZIP archive but not a PyTorch checkpoint (no data.pkl inside); if it holds "
            "one, unzip it and convert that file")


def is_pickle(head: bytes) -> bool:
    """A pickle of protocol 2 or later (what ``pickle.dump`` writes) starts with PROTO."""
    return head[:1] == b"\x80" and not head.startswith(LEGACY_MAGIC)


#: How much of a plain pickle ``pickle_kind`` reads: its first keys and class names come
#: long before the arrays' bytes.
PICKLE_SCAN_BYTES = 1 << 20
_PICKLE_SCAN_OPCODES = 100_000

#: Detectron2 parameter names (what m2t-convert and the model zoo's .pkl files hold).
_DETECTRON2_NAMES = ("stem.conv1", "res2.", "res5.", "conv1_w", "res_conv1_bn")


def pickle_kind(data: bytes) -> str:
    """Why a plain pickle starting with ``data`` is not a checkpoint, naming what it is.

    The pickle is only parsed (``pickletools.genops``), never run: its strings and the
    classes it names tell a DeepMind BYOL (JAX/Haiku) checkpoint and a Detectron2 .pkl apart
    from any other pickle.
    """
    strings = _pickle_strings(data)
    plain = "is a plain Python pickle, not a PyTorch checkpoint"
    haiku = any("/~/" in s for s in strings)  # Haiku's module path separator
    if "experiment_state" in strings and (
            haiku or "online_params" in strings or any("ByolExperimentState" in s
                                                      for s in strings)):
        return (f"{plain}: a DeepMind BYOL checkpoint (JAX/Haiku: experiment_state with "
                f"online_params / target_params), which m2t-convert does not read; export its "
                f"online_params to a torchvision state dict with torch.save and convert that")
    if haiku:
        return (f"{plain}: JAX/Haiku parameters (names like '.../~/...'), which m2t-convert "
                f"does not read; export them to a torchvision state dict with torch.save")
    if any(name in s for s in strings for name in _DETECTRON2_NAMES) or "__author__" in strings:
        return (f"{plain}: a Detectron2 .pkl (names like 'stem.conv1', 'res2'), such as "
                f"m2t-convert writes, is already converted: give it to m2t-transfer as it is")
    return f"{plain} (expected a file written by torch.save)"


def _pickle_strings(data: bytes) -> set[str]:
    """The text arguments of the first opcodes of the pickle ``data`` (keys, class names)."""
    strings: set[str] = set()
    try:
        for count, (_, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if count >= _PICKLE_SCAN_OPCODES:
                break
            if isinstance(arg, str) and len(arg) < 1000:
                strings.add(arg)
    except Exception:  # the scan ends where ``data`` is cut, or where the pickle is damaged
        pass
    return strings


def is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length < 100_000_000 and head[8:10] in (b'{"', b"{'", b"{ ", b"{}")


def _as_text(head: bytes) -> str | None:
    """``head`` as text, if it is UTF-8 without control characters (a multi-byte character
    may be cut at the end)."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return None if any(ord(c) < 32 and c not in "\t\n\r" for c in text) else text
    return None
