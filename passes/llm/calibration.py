"""Calibration: run a graph on sample prompts with the reference interpreter and record
statistics of the activations that quantization passes need.

Activation-aware quantization (AWQ, SmoothQuant), static activation scales (FP8) and KV-cache
scales all depend on what values flow through the model, which the weights alone cannot
tell.  A *calibration set* is a list of token-id lists: read from a JSON file
(``[[1, 2, ...], ...]``), or from a text file (prompts separated by blank lines) tokenized with
the model's tokenizer.  ``passes/llm/calibration.txt`` is the built-in default set; ``irlm compile``
tokenizes it (or ``--calib FILE``) and hands the passes the token ids as a JSON file, so the
pipeline string in ``engine.json`` is enough to replay the compile.

:func:`observe` runs every prompt as one request through the graph (the stateless form or the
paged inference form) and keeps, per observed operand, the per-channel absolute maximum and
mean, the tensor's absolute maximum, and a bounded sample of rows (the AWQ search needs real
activations, not just summaries).  Observation hooks into the interpreter's per-op overrides,
so nothing but the statistics stays in memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from irlm.errors import IRLMError
from irlm.input_limits import read_bounded
from irlm.ir import Graph, Op, Value
from irlm.ops.llm import KV_CACHE_INPUT, KVCacheLayout

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")
MAX_PROMPT_TOKENS = 256
MAX_SAMPLE_ROWS = 512


#: calibration files larger than this are refused before they are read (the built-in set is
#: a few kB; a calibration run reads a few hundred prompts)
MAX_CALIBRATION_BYTES = 64 << 20


class CalibrationError(IRLMError):
    """A calibration file that cannot be read or does not fit the model."""


# ----- the calibration set -----------------------------------------------------------------------


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file: paragraphs separated by blank lines."""
    data = read_bounded(path, MAX_CALIBRATION_BYTES, "calibration file", CalibrationError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path}: not UTF-8 text ({e.reason} at byte "
                               f"{e.start})") from None
    prompts = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CalibrationError(f"calibration file {path}: no prompts (prompts are separated "
                               f"by blank lines)")
    return prompts


def tokenize_prompts(prompts: Sequence[str], tokenizer,
                     max_tokens: int = MAX_PROMPT_TOKENS) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's special tokens), cut to ``max_tokens``."""
    out = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"] if callable(tokenizer) else tokenizer.encode(p).ids
        if ids:
            out.append([int(i) for i in ids[:max_tokens]])
    return out


def read_token_lists(path: Path) -> list[list[int]]:
    """A JSON calibration set: a non-empty list of non-empty lists of token ids."""
    raw = read_bounded(path, MAX_CALIBRATION_BYTES, "calibration file", CalibrationError)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path}: not UTF-8 text ({e.reason} at byte "
                               f"{e.start})") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise CalibrationError(f"calibration file {path}: JSON nested too deeply") from None
    ok = isinstance(data, list) and data and all(
        isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p)
        for p in data)
    if not ok:
        raise CalibrationError(f"calibration file {path}: expected a JSON list of token-id "
                               f"lists, e.g. [[1, 42, 7], [1, 99]]")
    return [list(p[:MAX_PROMPT_TOKENS]) for p in data]


def write_token_lists(prompts: Sequence[Sequence[int]], path: Path) -> Path:
    from irlm.safe_io import make_dir, write_text
    path = Path(path)
    make_dir(path.parent)
    return write_text(path, "[" + ",\n ".join(json.dumps(list(p)) for p in prompts) + "]\n")


def load_calibration(calib: str, tokenizer: str = "") -> list[list[int]]:
    """The calibration set named by a pass's ``calib`` / ``tokenizer`` options: a ``.json``
    file of token ids, or a text file (``""``: the built-in set) tokenized by the tokenizer
    at ``tokenizer`` (a tokenizer.json or a directory holding one)."""
    path = Path(calib) if calib else DEFAULT_CALIBRATION
    if path.suffix == ".json":
        return read_token_lists(path)
    prompts = read_prompts(path)
    if not tokenizer:
        raise CalibrationError(
            f"calibration text {path} needs a tokenizer: pass tokenizer=PATH (tokenizer.json) "
            f"or calib=FILE.json with token ids (irlm compile does this for you)")
    tp = Path(tokenizer)
    if tp.is_dir():
        tp = tp / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tp))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise CalibrationError(f"tokenizer {tokenizer}: cannot load ({e})") from None
    return tokenize_prompts(prompts, tok)


# ----- observation -------------------------------------------------------------------------------


@dataclass
class ActStats:
    """Statistics of one activation over the calibration set (rows = tokens, channels = the
    last dim)."""
    absmax: Optional[torch.Tensor] = None      # [C] float32
    abssum: Optional[torch.Tensor] = None      # [C] float64
    rows: int = 0
    samples: list = field(default_factory=list)
    stride: int = 1
    last_run: int = -1        # layers sharing this input record it once per prompt

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        a = x.abs()
        m = a.amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        s = a.sum(dim=0, dtype=torch.float64)
        self.abssum = s if self.abssum is None else self.abssum + s
        self.samples.append(x[::self.stride].clone())
        self.rows += x.shape[0]

    @property
    def amax(self) -> float:
        return float(self.absmax.max()) if self.absmax is not None else 0.0

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abssum / max(self.rows, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)[:MAX_SAMPLE_ROWS]


@dataclass
class Observations:
    inputs: dict[int, ActStats] = field(default_factory=dict)   # id(op) -> its input's stats
    kv: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> (k, v amax)
    tokens: int = 0
    prompts: int = 0


def _inference_inputs(graph: Graph, ids: list[int]) -> list[torch.Tensor]:
    """One request prefilling ``ids`` from an empty cache, in the graph's input order."""
    n = len(ids)
    feed = {}
    cache = next((v for v in graph.inputs if v.name == KV_CACHE_INPUT), None)
    if cache is not None:
        layout = KVCacheLayout.of(cache)
        nb = -(-n // int(layout.block_size))
        shape = list(layout._replace(blocks=nb))
        feed = {"input_ids": torch.tensor(ids, dtype=torch.int64),
                "position_ids": torch.arange(n, dtype=torch.int64),
                "q_lens": torch.tensor([n], dtype=torch.int32),
                "cached_lens": torch.zeros(1, dtype=torch.int32),
                "block_tables": torch.arange(nb, dtype=torch.int32)[None],
                KV_CACHE_INPUT: torch.zeros(shape, dtype=cache.type.dtype.torch)}
    else:
        feed = {"input_ids": torch.tensor([ids], dtype=torch.int64),
                "attention_mask": torch.ones(1, n, dtype=torch.int64),
                "position_ids": torch.arange(n, dtype=torch.int64)[None]}
    out = []
    for v in graph.inputs:
        if v.name not in feed:
            raise CalibrationError(f"calibration cannot feed graph input {v.label()} (it feeds "
                                   f"input_ids, position_ids, attention_mask and the paged "
                                   f"inference form's inputs)")
        x = feed[v.name]
        if x.dtype != v.type.dtype.torch:
            x = x.to(v.type.dtype.torch)
        out.append(x)
    return out


def _weights_device(graph: Graph) -> torch.device:
    """The device of the embedding table (the CPU when there is none)."""
    for op in graph.ops:
        if op.name == "core.embedding":
            p = op.operands[0].producer
            if p is not None and p.name == "param":
                return graph.weights.get(p.attrs["name"]).device
    return torch.device("cpu")


def _vocab_size(graph: Graph) -> Optional[int]:
    for op in graph.ops:
        if op.name == "core.embedding":
            d = op.operands[0].type.shape[0]
            return d if isinstance(d, int) else None
    return None


def observe(graph: Graph, prompts: Sequence[Sequence[int]], linears: Iterable[Op] = (),
            kv: bool = False) -> Observations:
    """Run each prompt through ``graph`` and record the input (operand 0) of each op in
    ``linears`` and, with ``kv``, the key/value absolute maxima of each paged attention."""
    from irlm.interpreter import Interpreter
    from irlm.registry import get_op_def

    vocab = _vocab_size(graph)
    for i, p in enumerate(prompts):
        bad = [t for t in p if vocab is not None and t >= vocab]
        if bad:
            raise CalibrationError(f"calibration prompt {i}: token id {bad[0]} is outside the "
                                   f"model's vocabulary of {vocab}")
    total = sum(len(p) for p in prompts)
    stride = max(1, -(-total // MAX_SAMPLE_ROWS))
    obs = Observations(tokens=total, prompts=len(prompts))
    by_value: dict[int, ActStats] = {}
    watched: dict[int, Value] = {}
    for op in linears:
        x = op.operands[0]
        stats = by_value.setdefault(id(x), ActStats(stride=stride))
        obs.inputs[id(op)] = stats
        watched[id(op)] = x
    overrides = {}
    names = {op.name for op in linears}
    for name in names:
        ref = get_op_def(name).reference

        def hook(ctx, args, attrs, _ref=ref):
            if id(ctx.op) in watched:
                st = obs.inputs[id(ctx.op)]
                if st.last_run != run_no[0]:
                    st.last_run = run_no[0]
                    st.add(args[0])
            return _ref(ctx, args, attrs)
        overrides[name] = hook
    if kv:
        ref_att = get_op_def("llm.paged_attention").reference

        def att_hook(ctx, args, attrs):
            layer = attrs["layer"]
            k, v = float(args[1].abs().max()), float(args[2].abs().max())
            old = obs.kv.get(layer, (0.0, 0.0))
            obs.kv[layer] = (max(old[0], k), max(old[1], v))
            return ref_att(ctx, args, attrs)
        overrides["llm.paged_attention"] = att_hook
    device = _weights_device(graph)     # run where the weights are (a GPU for large models)
    interp = Interpreter(graph, check_types=False, overrides=overrides, device=device)
    run_no = [0]
    with torch.no_grad():
        for p in prompts:
            run_no[0] += 1
            interp.run([x.to(device) for x in _inference_inputs(graph, list(p))])
    return obs
