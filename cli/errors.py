"""How a `treerpo` command ends when it cannot go on: the exit codes, the errors that end it in one
line (cli.main prints them), and the checks behind them: argparse types, input files, output
folders. Every command checks its input before it loads a model or writes anything (docs/cli.md,
"Errors and exit codes"), so a rejected command leaves no half-made output folder behind.

Imports nothing of this package: every cli module may use it (cli.workflow reads workflow files with it).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import stat
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_COMFY = 0, 1, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class CommandError(SystemExit):
    """Ends a command: cli.main prints ``error: <message>`` as one line and the process exits with
    ``exit_code``. A SystemExit, so a caller that bypasses cli.main still stops, and str() is the message."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str):
        super().__init__(message)
        self.code = self.exit_code


class BadInput(CommandError):
    """An option, file or value rejected before the command starts (exit 2, as `treerpo run`)."""

    exit_code = EXIT_USAGE


# ---------------------------------------------------------------------------- argparse types
def _number(kind, ok, need: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")


def int_list(text: str) -> list[int]:
    """A comma list of integers >= 1 (--sweep-prompts 1,2,4,8)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {text!r}")
    return [positive_int(p) for p in parts]


# ---------------------------------------------------------------------------- files and folders
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return "a file" if stat.S_ISREG(mode) else next((name for test, name in _KINDS if test(mode)), "a special file")


def read_text(path, noun: str, option: str = "", error=BadInput) -> str:
    """The text of an input file, or ``error`` saying what is wrong with it: missing, a folder or a
    device, unreadable, not UTF-8 (a byte-order mark is allowed), empty."""
    p = Path(path)
    where = f"{option} {p}" if option else str(p)
    try:
        mode = p.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{where}: no such {noun}") from None
    except OSError as e:
        raise error(f"{where}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{where}: a folder, expected a {noun}")
    if not stat.S_ISREG(mode):
        raise error(f"{where}: {_kind(mode)}, not a regular file; expected a {noun}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise error(f"{where}: cannot be read ({e.strerror})") from None
    if not data:
        raise error(f"{where}: the {noun} is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    f"expected a {noun}") from None


def _mode(p: Path, option: str) -> int | None:
    """``p``'s file mode, None if nothing is there."""
    try:
        return p.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise BadInput(f"{option} {p}: {e.strerror}") from None


def _creatable(p: Path, option: str) -> None:
    """``p`` does not exist: its nearest existing parent must be a folder we may write in."""
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"{option} {p}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {p}: cannot be created, {parent} is not writable")


def output_dir(path, option: str) -> Path:
    """Check that ``path`` is a writable folder or can become one; creates nothing."""
    p = Path(path)
    mode = _mode(p, option)
    if mode is None:
        _creatable(p, option)
        return p
    if not stat.S_ISDIR(mode):
        raise BadInput(f"{option} {p}: {_kind(mode)} is there, expected a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {p}: the folder is not writable")
    return p


def output_file(path, option: str) -> Path:
    """Check that ``path`` can be written as a file (an existing one is replaced); creates nothing."""
    p = Path(path)
    mode = _mode(p, option)
    if mode is None:
        _creatable(p, option)
    elif stat.S_ISDIR(mode):
        raise BadInput(f"{option} {p}: a folder, expected a file name")
    return p


def make_dir(path, option: str) -> Path:
    """Create a folder checked by output_dir: what the system still refuses (a read-only place) is bad input too."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{option} {p}: cannot create the folder ({e.strerror})") from None
    return p
