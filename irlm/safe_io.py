"""Writing output files safely: whole or not at all, never through a link, with the umask's mode.

Every file irlm writes (engine files, IR dumps, calibration tokens, ``irlm opt -o``) goes
through :func:`atomic_path` (or its wrappers :func:`write_text` / :func:`write_bytes`):

* the data goes to a fresh temporary file in the destination's directory (created with
  ``O_EXCL``, so it cannot be a pre-placed link), which is then renamed over the destination.
  A rename replaces a symlink sitting at the destination instead of writing to its target, and
  a failure (disk full, an exception in the writer) leaves the old file, or none, never a
  truncated one;
* the file gets mode ``0o666 & ~umask`` like any file a shell creates (some writers, such as
  safetensors, create theirs ``0600``);
* an OS error becomes one :class:`OutputError` line naming the file and the reason.

:func:`make_dir` creates output directories, replacing a symlink found where a directory of
ours goes; :func:`prepare_output_dir` decides whether a command may write into a directory at
all (never the source it reads; a non-empty directory that is not its own output only with
``--force``).
"""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import IRLMError


class OutputError(IRLMError):
    """An output that cannot (or may not) be written."""


def _umask() -> int:
    try:                                          # Linux: read without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)                        # elsewhere: the usual set-and-restore
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new output file gets: ``0o666`` less the process umask."""
    return 0o666 & ~_umask()


def describe_os_error(path: Path, e: BaseException) -> str:
    """One line: the file, and the reason in words (disk full said plainly)."""
    code = getattr(e, "errno", None)
    if code is None and "os error " in str(e):        # Rust writers (safetensors) embed it
        try:
            code = int(str(e).rsplit("os error ", 1)[1].rstrip(")").split()[0])
        except ValueError:
            code = None
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device (disk full or over quota)"
    elif code == errno.EFBIG:
        reason = "file too large for the file system or the process's file size limit"
    elif code is not None:
        reason = os.strerror(code).lower()
    else:
        reason = str(e) or type(e).__name__
    return f"{path}: cannot write: {reason}"


@contextmanager
def atomic_path(path, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on a clean exit it is given the
    umask's mode and renamed onto ``path``, on an error it is removed.  For writers that
    take a path (``safetensors.save_file``)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise OutputError(describe_os_error(path, e)) from None
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise OutputError(describe_os_error(path, e)) from None
        raise


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    return Path(path)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def make_dir(path) -> Path:
    """``path`` as a real directory (parents created): a symlink found there is removed and
    replaced by a directory, so writes below it cannot land elsewhere."""
    path = Path(path)
    try:
        if path.is_symlink():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create the directory: "
                          f"{os.strerror(e.errno).lower() if e.errno else e}") from None
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory")
    return path


def prepare_output_dir(out, *, flag: str, force: bool, sources: Iterable,
                       owned: Callable[[str], bool]) -> Path:
    """Check that a command may write into directory ``out`` and create it.

    Refused always: ``out`` is (or resolves to) one of ``sources``, the directories the
    command reads its input from, or exists as a non-directory.  Refused without ``force``:
    ``out`` holds an entry that ``owned(name)`` does not claim (a directory that is not this
    command's earlier output)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a directory")
    real = os.path.realpath(out)
    for src in sources:
        if src is not None and os.path.realpath(src) == real:
            raise OutputError(f"{flag} {out}: is the source model's directory; irlm never "
                              f"writes into its input (choose another output directory)")
    if out.is_dir() and not force:
        foreign = sorted(e.name for e in os.scandir(out) if not owned(e.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(f"{flag} {out}: not empty and not an irlm output (it holds "
                              f"{shown}); choose an empty directory or pass --force")
    return make_dir(out)
