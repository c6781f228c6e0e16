"""Reading an engine directory: only the files its manifest lists, only from inside it.

An engine directory is data: ``irlm run DIR`` may be handed one from anywhere.  Every byte the
loader reads from it goes through :class:`EngineFiles`, which enforces, for each file:

* its name, as the manifest spells it, is a relative POSIX path with no ``..``, no empty or
  ``.`` component, no backslash or NUL (checked on the string, before anything is stat'ed, so
  the manifest cannot probe the rest of the file system);
* it is listed in the manifest with its size and SHA-256, and the bytes match;
* once symlinks are resolved it still lies inside the engine directory;
* it is a regular file (opened non-blocking and checked with ``fstat``, so a FIFO or a device
  is refused instead of hanging the loader or being read forever).

The manifest itself (``engine.json``) is read through :func:`read_manifest`: bounded in size,
its JSON nesting bounded, every section type-checked, and its own ``manifest_sha256`` (over
``config``, ``parallel`` and ``files``) verified, so an edit of the build config or of the rank
layout is detected like an edit of the weights.  What the checksums do and do not protect
against is in docs/security.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Optional

from irlm.errors import IRLMError
from irlm.input_limits import parse_json_bounded


class EngineError(IRLMError):
    """An engine directory that cannot be loaded."""


#: engine.json larger than this is refused before it is read (a real one is a few kB)
MAX_MANIFEST_BYTES = 8 << 20
#: deepest JSON nesting accepted in engine.json (a real one nests 4 deep)
MAX_MANIFEST_DEPTH = 32
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 22


def check_member_name(name: Any, where: str) -> str:
    """``name`` if it is a safe relative path of a file inside an engine directory."""
    if not isinstance(name, str) or not name:
        raise EngineError(f"{where}: file name {name!r} is not a non-empty string")
    bad = None
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        bad = "is absolute"
    elif "\\" in name or "\0" in name:
        bad = "contains a backslash or NUL"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        bad = "has an empty, '.' or '..' component"
    if bad:
        raise EngineError(f"{where}: file name {name!r} {bad}; an engine lists only files "
                          f"inside its own directory")
    return name


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ----- type checks of the manifest sections -----------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or check(x)


_CONFIG_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "source": (lambda x: isinstance(x, str), "a string"),
    "model_type": (_opt(lambda x: isinstance(x, str)), "a string or null"),
    "architecture": (lambda x: isinstance(x, str), "a string"),
    "dtype": (lambda x: x in ("f32", "f16", "bf16"), "one of f32, f16, bf16"),
    "max_model_len": (lambda x: _is_int(x) and 0 < x <= 1 << 24, "an int in [1, 2**24]"),
    "eos_token_id": (_opt(lambda x: (_is_int(x) and x >= 0) or (
        isinstance(x, list) and all(_is_int(t) and t >= 0 for t in x))),
        "a token id, a list of them, or null"),
    "bos_token_id": (_opt(lambda x: _is_int(x) and x >= 0), "a token id or null"),
    "pipeline": (lambda x: isinstance(x, str), "a string"),
    "irlm_version": (lambda x: isinstance(x, str), "a string"),
    "activation_arena_bytes": (lambda x: _is_int(x) and x >= 0, "an int >= 0"),
    "rank": (lambda x: _is_int(x) and x >= 0, "an int >= 0"),
    "tp_rank": (lambda x: _is_int(x) and x >= 0, "an int >= 0"),
    "pp_stage": (lambda x: _is_int(x) and x >= 0, "an int >= 0"),
}


def check_config(config: Any, where: str) -> dict:
    """The manifest's ``config``: a dict whose known fields have their types."""
    if not isinstance(config, dict):
        raise EngineError(f"{where}: \"config\" must be an object, got {type(config).__name__}")
    for key, (ok, valid) in _CONFIG_FIELDS.items():
        if key in config and not ok(config[key]):
            raise EngineError(f"{where}: config.{key} must be {valid}, got {config[key]!r:.80}")
    return config


def check_parallel(par: Any, where: str) -> dict:
    """The manifest's ``parallel``: tp, pp >= 1 and tp*pp ranks in order, each in its own
    sub-directory (a safe relative name)."""
    if not isinstance(par, dict):
        raise EngineError(f"{where}: \"parallel\" must be an object")
    tp, pp, ranks = par.get("tp"), par.get("pp"), par.get("ranks")
    for key, v in (("tp", tp), ("pp", pp)):
        if not _is_int(v) or not 1 <= v <= 4096:
            raise EngineError(f"{where}: parallel.{key} must be an int in [1, 4096], got {v!r:.40}")
    if not isinstance(ranks, list) or len(ranks) != tp * pp:
        raise EngineError(f"{where}: parallel.ranks must list tp*pp = {tp * pp} ranks")
    for r, rk in enumerate(ranks):
        want = {"rank": r, "tp_rank": r % tp, "pp_stage": r // tp}
        if not isinstance(rk, dict) or any(rk.get(k) != v for k, v in want.items()):
            raise EngineError(f"{where}: parallel.ranks[{r}] must be {want} with a path")
        check_member_name(rk.get("path"), f"{where}: parallel.ranks[{r}].path")
    return par


def _check_listing(files: Any, where: str) -> dict[str, tuple[int, str]]:
    if not isinstance(files, dict):
        raise EngineError(f"{where}: \"files\" must be an object of name -> {{bytes, sha256}}")
    listing = {}
    for name, info in files.items():
        check_member_name(name, f"{where}: files")
        if not isinstance(info, dict) or not _is_int(info.get("bytes")) or info["bytes"] < 0 \
                or not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            raise EngineError(f"{where}: files[{name!r}] must be {{\"bytes\": int >= 0, "
                              f"\"sha256\": 64 hex digits}}")
        listing[name] = (info["bytes"], info["sha256"])
    return listing


# ----- the manifest and the files ---------------------------------------------------------------
def read_manifest(path: Path, data: Optional[bytes] = None, *, format_name: str,
                  version: int) -> dict:
    """Read and check ``path`` (an engine.json), or ``data`` already read from it (a rank's
    manifest, verified against the top-level listing): size, JSON, format, version, its own
    checksum, and the types of ``config``, ``parallel`` and ``files``."""
    if data is None:
        data = _read_regular(path.parent, path, MAX_MANIFEST_BYTES, str(path))
    manifest = parse_json_bounded(data, str(path), max_depth=MAX_MANIFEST_DEPTH,
                                  error=EngineError)
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise EngineError(f"{path}: not an irlm engine manifest")
    if manifest.get("version") != version:
        raise EngineError(f"{path.parent}: engine format version {manifest.get('version')!r:.20} "
                          f"is not supported by this irlm (expects {version}); recompile it")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise EngineError(f"{path}: manifest checksum mismatch (engine.json was edited or "
                          f"corrupted after the compile)")
    check_config(manifest.get("config", {}), str(path))
    if "parallel" in manifest:
        check_parallel(manifest["parallel"], str(path))
    _check_listing(manifest.get("files"), str(path))
    return manifest


def _read_regular(root: Path, path: Path, limit: int, where: str) -> bytes:
    """The bytes of ``path`` if it is a regular file inside ``root`` of at most ``limit``
    bytes (the manifest, before its listing can be trusted)."""
    with _open_inside(root, path, where) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise EngineError(f"{where}: {size} bytes, more than the {limit} an engine "
                              f"manifest may have")
        return f.read(limit + 1)


class _open_inside:
    """Open ``path`` for reading if, symlinks resolved, it lies inside ``root`` and is a
    regular file; a context manager over the file object."""

    def __init__(self, root: Path, path: Path, where: str):
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise EngineError(f"{where}: a symbolic link leading outside the engine directory; "
                              f"an engine may only read its own files")
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | \
            getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except FileNotFoundError:
            raise EngineError(f"{where}: missing") from None
        except OSError as e:
            raise EngineError(f"{where}: cannot open ({e.strerror})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise EngineError(f"{where}: is {kind}, not a regular file")
        os.set_blocking(fd, True)
        self.file, self.real = os.fdopen(fd, "rb"), Path(real)

    def __enter__(self):
        return self.file

    def __exit__(self, *exc):
        self.file.close()


class EngineFiles:
    """The files one engine directory's manifest lists; every read of them is checked."""

    def __init__(self, root: Path, files: Any, *, verify_checksums: bool = True,
                 manifest_path: Optional[Path] = None):
        self.root = Path(root)
        self.where = str(manifest_path or self.root / "engine.json")
        self.listing = _check_listing(files, self.where)
        self.verify_checksums = verify_checksums
        self._checked: dict[str, Path] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.listing

    def path(self, name: str) -> Path:
        """The real path of listed file ``name``, after checking where it lies, its type,
        its size and (unless disabled) its checksum.  For readers that need a path
        (safetensors memory-maps the weights)."""
        if name in self._checked:
            return self._checked[name]
        with self._open(name) as (f, real):
            self._verify(name, f)
        self._checked[name] = real
        return real

    def read_bytes(self, name: str) -> bytes:
        """The checked bytes of listed file ``name`` (the bytes read are the bytes hashed)."""
        with self._open(name) as (f, _):
            data = self._verify(name, f, keep=True)
        return data

    def read_text(self, name: str) -> str:
        data = self.read_bytes(name)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EngineError(f"{self.root / name}: not UTF-8 text (byte {e.start})") from None

    def check_all(self) -> None:
        for name in self.listing:
            self.path(name)

    def refuse_unlisted(self, names) -> None:
        """Refuse when one of ``names`` (files the loader would otherwise use) sits in the
        directory without being listed: added, or its entry removed, after the compile."""
        for name in names:
            if name not in self.listing and os.path.lexists(self.root / name):
                raise EngineError(f"{self.root / name}: present but not listed in {self.where} "
                                  f"(added or its entry removed after the compile); remove it "
                                  f"or recompile")

    def copy_to(self, names, dest: Path) -> list[str]:
        """Copy the listed ones of ``names`` into ``dest`` as checked bytes (for loaders that
        read a whole directory, like transformers' tokenizer)."""
        copied = []
        for name in names:
            if name in self.listing:
                target = Path(dest) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.read_bytes(name))
                copied.append(name)
        return copied

    def subdirectory(self, name: str) -> Path:
        """``root/name`` as a directory inside the engine (a rank's engine)."""
        check_member_name(name, self.where)
        real_root, real = os.path.realpath(self.root), os.path.realpath(self.root / name)
        if os.path.commonpath([real_root, real]) != real_root:
            raise EngineError(f"{self.root / name}: a symbolic link leading outside the engine "
                              f"directory; an engine may only read its own files")
        return self.root / name

    # ----- internals -------------------------------------------------------------------------
    def _open(self, name: str):
        if name not in self.listing:
            raise EngineError(f"{self.root / name}: not listed in {self.where}; an engine "
                              f"reads only the files its manifest lists")
        check_member_name(name, self.where)
        if not os.path.lexists(self.root / name):
            raise EngineError(f"{self.root}: missing file {name}")
        return _Opened(self.root, self.root / name, str(self.root / name))

    def _verify(self, name: str, f, keep: bool = False) -> Optional[bytes]:
        size, digest = self.listing[name]
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise EngineError(f"{self.root / name}: size {actual} bytes, the manifest says "
                              f"{size} (truncated or replaced)")
        if not (self.verify_checksums or keep):
            return None
        h, parts, total = hashlib.sha256(), [], 0
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            total += len(chunk)
            if total > size:                       # grew while read: do not read forever
                raise EngineError(f"{self.root / name}: changed while being read")
            h.update(chunk)
            if keep:
                parts.append(chunk)
        if self.verify_checksums and h.hexdigest() != digest:
            raise EngineError(f"{self.root / name}: checksum mismatch (the file is corrupted "
                              f"or was modified)")
        return b"".join(parts) if keep else None


class _Opened:
    def __init__(self, root: Path, path: Path, where: str):
        self._inner = _open_inside(root, path, where)

    def __enter__(self):
        return self._inner.file, self._inner.real

    def __exit__(self, *exc):
        self._inner.file.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
