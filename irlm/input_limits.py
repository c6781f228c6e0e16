"""Reading hostile input files at a bounded cost: sizes checked before reading, JSON nesting
checked before parsing, every failure one line of the caller's error type.

Used by every reader of files a user may be handed (engine manifests, calibration sets, model
configs); the limits each reader applies are listed in docs/security.md."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from irlm.errors import IRLMError

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def read_bounded(path, limit: int, what: str, error: type[IRLMError] = IRLMError) -> bytes:
    """The bytes of regular file ``path`` if it has at most ``limit`` bytes (checked before
    reading; a FIFO or a device is refused instead of read forever)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{what} {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path}: not a regular file")
        if st.st_size > limit:
            raise error(f"{what} {path}: {st.st_size} bytes, more than the {limit} allowed")
        os.set_blocking(fd, True)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {path}: grew past {limit} bytes while being read")
    return data


def parse_json_bounded(data: bytes, where: str, *, max_depth: int,
                       error: type[IRLMError] = IRLMError) -> Any:
    """Parse JSON bytes, refusing non-UTF-8, bad syntax and nesting deeper than
    ``max_depth`` with one line each.  The nesting is measured on the brackets before
    parsing, so a 100,000-deep document costs a linear scan, not a recursion."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    level = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        level += 1 if m.group() in "[{" else -1
        if level > max_depth:
            raise error(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise error(f"{where}: corrupted JSON ({e})") from None
