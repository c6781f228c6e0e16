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

Loading checks the format version, every file's size and SHA-256, that the plan parses and
verifies, and that every weight the plan reads exists with its declared type, so a corrupted,
truncated or mismatched engine is refused with a message saying what is wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from irlm.errors import IRLMError
from irlm.ir import Graph

ENGINE_FORMAT = "irlm-engine"
ENGINE_VERSION = 1
PLAN_FILE, WEIGHTS_FILE, MANIFEST = "plan.irlm", "weights.safetensors", "engine.json"


class EngineError(IRLMError):
    """An engine directory that cannot be loaded."""


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
    from safetensors.torch import save_file
    from irlm.text.printer import print_graph
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for op in graph.params():
        name = op.attrs["name"]
        t = graph.weights.get(name)
        tensors[name] = t.contiguous()
    # safetensors refuses tensors that share storage (tied embeddings); store copies.
    seen: dict[int, str] = {}
    for k, t in list(tensors.items()):
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            tensors[k] = t.clone()
        elif ptr is not None:
            seen[ptr] = k
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / PLAN_FILE).write_text(print_graph(graph), encoding="utf-8")
    files = [PLAN_FILE, WEIGHTS_FILE]
    files += _save_tokenizer(tokenizer, out)
    _write_manifest(out, config, files)
    return out


def write_parallel_engine(graphs: list[Graph], out: Path, config: dict[str, Any], *, tp: int,
                          pp: int, tokenizer=None) -> Path:
    """Write one engine per rank under ``out/rank{r}`` and the top-level manifest."""
    if len(graphs) != tp * pp:
        raise EngineError(f"{len(graphs)} rank graphs for tp {tp} x pp {pp}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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


def _save_tokenizer(tokenizer, out: Path) -> list[str]:
    """Save the tokenizer (if any) into ``out``; the files it wrote, for the manifest."""
    if tokenizer is None:
        return []
    tokenizer.save_pretrained(str(out))
    return [f for f in TOKENIZER_FILES if (out / f).exists()]


def _write_manifest(out: Path, config: dict[str, Any], files: list[str], **extra) -> None:
    """engine.json: format, version, config (and ``extra`` sections), and the size and SHA-256
    of every file the engine consists of, so a load can refuse a modified one."""
    manifest = {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "config": config, **extra,
                "files": {f: {"bytes": (out / f).stat().st_size, "sha256": _sha256(out / f)}
                          for f in files}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


def load_engine(path, verify_checksums: bool = True) -> Engine:
    from irlm.text.parser import parse_graph
    from irlm.verifier import verify
    from irlm.weights import WeightStore
    path = Path(path)
    if not path.is_dir():
        raise EngineError(f"{path}: not an engine directory (it does not exist or is a file)")
    mpath = path / MANIFEST
    if not mpath.exists():
        raise EngineError(f"{path}: missing {MANIFEST}; is this an irlm engine directory?")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{mpath}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{mpath}: not an irlm engine manifest")
    if manifest.get("version") != ENGINE_VERSION:
        raise EngineError(f"{path}: engine format version {manifest.get('version')} is not "
                          f"supported by this irlm (expects {ENGINE_VERSION}); recompile it")
    files = manifest.get("files")
    if "parallel" in manifest:
        return _load_parallel(path, manifest, verify_checksums)
    if not isinstance(files, dict) or PLAN_FILE not in files or WEIGHTS_FILE not in files:
        raise EngineError(f"{mpath}: manifest does not list {PLAN_FILE} and {WEIGHTS_FILE}")
    _check_files(path, files, verify_checksums)
    store = WeightStore()
    store.add_safetensors(path / WEIGHTS_FILE)
    graph = parse_graph((path / PLAN_FILE).read_text(encoding="utf-8"), str(path / PLAN_FILE),
                        weights=store)
    graph.weights = store
    verify(graph)
    tokenizer, template = None, None
    if (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        template = getattr(tokenizer, "chat_template", None)
    return Engine(path, graph, manifest.get("config", {}), tokenizer, template)


def _check_files(path: Path, files: dict, verify_checksums: bool) -> None:
    for name, info in files.items():
        f = path / name
        if not f.exists():
            raise EngineError(f"{path}: missing file {name}")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise EngineError(f"{f}: size {size} bytes, the manifest says {info.get('bytes')} "
                              f"(truncated or replaced)")
        if verify_checksums and _sha256(f) != info.get("sha256"):
            raise EngineError(f"{f}: checksum mismatch (the file is corrupted or was modified)")


def _load_parallel(path: Path, manifest: dict, verify_checksums: bool) -> Engine:
    par = manifest["parallel"]
    files = manifest.get("files")
    ranks = par.get("ranks") if isinstance(par, dict) else None
    if not isinstance(files, dict) or not isinstance(ranks, list) or not ranks or \
            len(ranks) != par.get("tp", 0) * par.get("pp", 0):
        raise EngineError(f"{path / MANIFEST}: malformed \"parallel\" section (needs tp, pp "
                          f"and tp*pp ranks)")
    for rk in ranks:
        if f"{rk.get('path')}/{MANIFEST}" not in files:
            raise EngineError(f"{path / MANIFEST}: rank {rk.get('rank')}'s {MANIFEST} is not "
                              f"listed with a checksum")
    _check_files(path, files, verify_checksums)
    engines = [load_engine(path / rk["path"], verify_checksums) for rk in ranks]
    tokenizer, template = None, None
    if (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        template = getattr(tokenizer, "chat_template", None)
    return Engine(path, engines[0].graph, manifest.get("config", {}), tokenizer, template,
                  ranks=engines, parallel={"tp": par["tp"], "pp": par["pp"]})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
