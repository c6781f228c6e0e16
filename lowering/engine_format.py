"""The native engine directory: what `irlm compile` writes and the runtime loads.

    ENGINE/
      engine.json          format version, build config, model facts, file checksums
      plan.irlm            the final graph (inference form) as IR text
      weights.safetensors  every weight the plan reads, already in its final dtype/layout
      tokenizer.json       (optional) the tokenizer; tokenizer_config.json holds the chat template

A multi-rank engine (``irlm compile --tp N`` or ``--pp N``) is a directory of such engines,
one per rank, under a top-level manifest::

    ENGINE/
      engine.json          as above, plus "parallel": {"tp", "pp", "ranks": [...]}; its files
                           are the tokenizer files and every rank's engine.json (checksummed)
      tokenizer.json       (optional), shared by all ranks
      rank0/ rank1/ ...    one engine each (engine.json, plan.irlm, its own weight shards)

Rank r is tp rank ``r % tp`` of pipeline stage ``r // tp``.

Loading checks the format version, the manifest's own checksum and field types, every file's
size and SHA-256, that the plan parses and verifies, and that every weight the plan reads exists
with its declared type, so a corrupted, truncated or mismatched engine is refused with a message
saying what is wrong.  Every file is read through lowering/engine_files.py: only files the
manifest lists, only regular files inside the engine directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from irlm import safe_io
from irlm.ir import Graph
from irlm.safe_io import make_dir
from irlm.lowering.engine_files import (EngineError, EngineFiles, manifest_digest, read_manifest,
                                        sha256_file)

ENGINE_FORMAT = "irlm-engine"
# 2: engine.json carries manifest_sha256 (over config, parallel and files)
ENGINE_VERSION = 2
PLAN_FILE, WEIGHTS_FILE, MANIFEST = "plan.irlm", "weights.safetensors", "engine.json"


@dataclass
class Engine:
    path: Path
    graph: Graph
    config: dict[str, Any]
    tokenizer: Any = None              # a transformers PreTrainedTokenizerFast, if shipped
    chat_template: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # multi-rank engines: each rank's Engine, in rank order; ``graph`` is then rank 0's
    ranks: list["Engine"] = field(default_factory=list)
    parallel: dict[str, Any] = field(default_factory=dict)


def write_engine(graph: Graph, out: Path, config: dict[str, Any], tokenizer=None) -> Path:
    """Write ``graph`` (inference form, weights in ``graph.weights``) as an engine directory."""
    from irlm.text.printer import print_graph
    out = make_dir(out)
    write_weights({op.attrs["name"]: graph.weights.get(op.attrs["name"])
                   for op in graph.params()}, out / WEIGHTS_FILE)
    safe_io.write_text(out / PLAN_FILE, print_graph(graph))
    files = [PLAN_FILE, WEIGHTS_FILE]
    files += _save_tokenizer(tokenizer, out)
    _write_manifest(out, config, files)
    return out


def write_parallel_engine(graphs: list[Graph], out: Path, config: dict[str, Any], *, tp: int,
                          pp: int, tokenizer=None) -> Path:
    """Write one engine per rank under ``out/rank{r}`` and the top-level manifest."""
    if len(graphs) != tp * pp:
        raise EngineError(f"{len(graphs)} rank graphs for tp {tp} x pp {pp}")
    out = make_dir(out)
    ranks = []
    for r, g in enumerate(graphs):
        sub = f"rank{r}"
        rank_config = dict(config, rank=r, tp_rank=r % tp, pp_stage=r // tp)
        write_engine(g, out / sub, rank_config)
        ranks.append({"rank": r, "tp_rank": r % tp, "pp_stage": r // tp, "path": sub})
    files = [f"{rk['path']}/{MANIFEST}" for rk in ranks]
    files += _save_tokenizer(tokenizer, out)
    _write_manifest(out, config, files, parallel={"tp": tp, "pp": pp, "ranks": ranks})
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def write_weights(tensors: dict, path: Path) -> None:
    """``{name: tensor}`` as one safetensors file, written whole (temp file + rename)."""
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    # safetensors refuses tensors that share storage (tied embeddings); store copies.
    seen: dict[int, str] = {}
    for k, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            tensors[k] = t.clone()
        elif ptr is not None:
            seen[ptr] = k
    _save_weights(tensors, path)


def _save_weights(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file
    with safe_io.atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp))
        except Exception as e:       # safetensors' own error type wraps the OS error
            raise safe_io.OutputError(safe_io.describe_os_error(path, e)) from None


def _save_tokenizer(tokenizer, out: Path) -> list[str]:
    """Save the tokenizer (if any) into ``out``; the files it wrote, for the manifest.
    transformers writes into a private directory first; each file is then renamed into
    place (never written through a link already in ``out``), and tokenizer files of an
    earlier compile that this one does not write are removed."""
    import shutil
    import tempfile
    written = []
    if tokenizer is not None:
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer-"))
        try:
            try:
                tokenizer.save_pretrained(str(tmp))
            except OSError as e:
                raise safe_io.OutputError(safe_io.describe_os_error(out / "tokenizer.json", e)) \
                    from None
            for f in TOKENIZER_FILES:
                if (tmp / f).is_file():
                    os.chmod(tmp / f, safe_io.file_mode())
                    os.replace(tmp / f, out / f)
                    written.append(f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for f in TOKENIZER_FILES:
        if f not in written and os.path.lexists(out / f):
            (out / f).unlink()
    return written


def _write_manifest(out: Path, config: dict[str, Any], files: list[str], **extra) -> None:
    """engine.json: format, version, config (and ``extra`` sections), and the size and SHA-256
    of every file the engine consists of, so a load can refuse a modified one."""
    manifest = {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "config": config, **extra,
                "files": {f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f)}
                          for f in files}}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    safe_io.write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def load_engine(path, verify_checksums: bool = True, *, _manifest_bytes: bytes | None = None,
                _rank: bool = False) -> Engine:
    from irlm.text.parser import parse_graph
    from irlm.verifier import verify
    from irlm.weights import WeightStore
    path = Path(path)
    if not path.is_dir():
        raise EngineError(f"{path}: not an engine directory (it does not exist or is a file)")
    mpath = path / MANIFEST
    if _manifest_bytes is None and not os.path.lexists(mpath):
        raise EngineError(f"{path}: missing {MANIFEST}; is this an irlm engine directory?")
    manifest = read_manifest(mpath, _manifest_bytes, format_name=ENGINE_FORMAT,
                             version=ENGINE_VERSION)
    files = EngineFiles(path, manifest["files"], verify_checksums=verify_checksums,
                        manifest_path=mpath)
    if "parallel" in manifest:
        if _rank:
            raise EngineError(f"{mpath}: a rank's engine cannot itself be multi-rank")
        return _load_parallel(path, manifest, files, verify_checksums)
    if PLAN_FILE not in files or WEIGHTS_FILE not in files:
        raise EngineError(f"{mpath}: manifest does not list {PLAN_FILE} and {WEIGHTS_FILE}")
    files.refuse_unlisted(TOKENIZER_FILES)
    files.check_all()
    store = WeightStore()
    store.add_safetensors(files.path(WEIGHTS_FILE))
    graph = parse_graph(files.read_text(PLAN_FILE), str(path / PLAN_FILE), weights=store)
    graph.weights = store
    verify(graph)
    tokenizer, template = _load_tokenizer(files)
    return Engine(path, graph, manifest.get("config", {}), tokenizer, template)


def _load_tokenizer(files: EngineFiles):
    """The tokenizer from the listed tokenizer files alone: their checked bytes are copied to a
    private directory for transformers, which would otherwise read whatever else lies in the
    engine directory (added_tokens.json, a stray special_tokens_map.json, ...)."""
    if "tokenizer.json" not in files:
        return None, None
    import tempfile
    from transformers import PreTrainedTokenizerFast
    with tempfile.TemporaryDirectory(prefix="irlm-tokenizer-") as tmp:
        files.copy_to(TOKENIZER_FILES, Path(tmp))
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp, local_files_only=True)
        except Exception as e:       # transformers/tokenizers raise many types on bad files
            raise EngineError(f"{files.root}: cannot load its tokenizer "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    return tokenizer, getattr(tokenizer, "chat_template", None)


def _load_parallel(path: Path, manifest: dict, files: EngineFiles,
                   verify_checksums: bool) -> Engine:
    par = manifest["parallel"]          # type-checked by read_manifest
    _check_rank_listing(path, par, files)
    files.refuse_unlisted(TOKENIZER_FILES)
    files.check_all()
    engines = [load_engine(files.subdirectory(rk["path"]), verify_checksums, _rank=True,
                           _manifest_bytes=files.read_bytes(f"{rk['path']}/{MANIFEST}"))
               for rk in par["ranks"]]
    tokenizer, template = _load_tokenizer(files)
    return Engine(path, engines[0].graph, manifest.get("config", {}), tokenizer, template,
                  ranks=engines, parallel={"tp": par["tp"], "pp": par["pp"]})
def load_engine_header(path, verify_checksums: bool = True) -> Engine:
    """A multi-rank engine's top level only: config, tokenizer, ``parallel`` (tp, pp, rank
    paths), its listed files checked; no rank is loaded (``ranks`` stays empty).  What the
    scheduler's process needs; each rank process loads its own shard (:func:`load_rank`)."""
    path = Path(path)
    manifest, files = _open_parallel(path, verify_checksums)
    par = manifest["parallel"]
    files.refuse_unlisted(TOKENIZER_FILES)
    files.check_all()
    tokenizer, template = _load_tokenizer(files)
    return Engine(path, None, manifest.get("config", {}), tokenizer, template,
                  parallel={"tp": par["tp"], "pp": par["pp"], "ranks": par["ranks"]})


def load_rank(path, rank: int, verify_checksums: bool = True) -> Engine:
    """Rank ``rank``'s engine of the multi-rank engine at ``path``, refused unless its
    engine.json is the one the top-level manifest lists (size and SHA-256): a rank directory
    from another compile cannot be mixed in."""
    path = Path(path)
    manifest, files = _open_parallel(path, verify_checksums)
    ranks = manifest["parallel"]["ranks"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(ranks):
        raise EngineError(f"{path}: rank {rank} is not a rank of this engine (it has "
                          f"{len(ranks)})")
    sub = ranks[rank]["path"]
    return load_engine(files.subdirectory(sub), verify_checksums, _rank=True,
                       _manifest_bytes=files.read_bytes(f"{sub}/{MANIFEST}"))


def _open_parallel(path: Path, verify_checksums: bool) -> tuple[dict, EngineFiles]:
    """The checked manifest of multi-rank engine ``path`` and its file reader."""
    if not path.is_dir():
        raise EngineError(f"{path}: not an engine directory (it does not exist or is a file)")
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        raise EngineError(f"{path}: missing {MANIFEST}; is this an irlm engine directory?")
    manifest = read_manifest(mpath, format_name=ENGINE_FORMAT, version=ENGINE_VERSION)
    if "parallel" not in manifest:
        raise EngineError(f"{path}: not a multi-rank engine (no \"parallel\" section)")
    files = EngineFiles(path, manifest["files"], verify_checksums=verify_checksums,
                        manifest_path=mpath)
    _check_rank_listing(path, manifest["parallel"], files)
    return manifest, files


def _check_rank_listing(path: Path, par: dict, files: EngineFiles) -> None:
    for rk in par["ranks"]:                 # par is type-checked by read_manifest
        if f"{rk['path']}/{MANIFEST}" not in files:
            raise EngineError(f"{path / MANIFEST}: rank {rk['rank']}'s {MANIFEST} is not "
                              f"listed with a checksum")
