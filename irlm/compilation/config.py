"""What a compile is asked to do: one typed :class:`CompileConfig`.

Every ``irlm compile`` flag is a field here (the CLI only parses flags into this); a
library user builds one directly::

    irlm.compile("SmolLM2.gguf", irlm.CompileConfig(output="engine", max_seq=512, quant="int8"))

:meth:`CompileConfig.check` refuses contradictory or out-of-range settings before anything is
loaded.  Messages name the ``irlm compile`` flag of the field (``--max-seq 0: ...``) so a CLI
user and a library user read the same line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..errors import IRLMError

DTYPES = ("f32", "f16", "bf16")
QUANT_MODES = ("int8", "int4", "int4-awq", "w8a8-sq", "fp8")
#: the --quant modes that read calibration prompts
CALIBRATED = ("int4-awq", "w8a8-sq", "fp8")
KV_CACHE_DTYPES = ("int8", "fp8")
INT4_GROUPS = (32, 64, 128)
DEVICES = ("any", "cpu", "cuda")
TARGETS = ("engine", "onnx", "tensorrt")
#: the --quant modes that work with --tp / --pp: no calibration, so each rank quantizes alone
WEIGHT_ONLY = ("int8", "int4")


@dataclass
class CompileConfig:
    """A compile's settings; the defaults are ``irlm compile``'s."""
    #: the engine directory (created); IR dumps go to ``output/ir/``
    output: Union[str, Path]
    #: ``"0"``, ``"1"`` or ``"2"`` (the named pipelines of irlm.passes.levels); None runs only
    #: ``pipeline``
    opt_level: Optional[str] = "2"
    #: extra passes run after the level's (pipeline text)
    pipeline: Optional[str] = None
    #: element type of weights and activations; None: the device's (``element_dtype``)
    dtype: Optional[str] = None
    max_batch: int = 8
    #: None: the model's max_position_embeddings, else 2048
    max_seq: Optional[int] = None
    tokens_per_block: int = 16
    max_num_tokens: int = 8192
    #: ranges of the traced dims, overriding max_batch / max_seq: ``{"seq": (1, 512)}``; a
    #: range of one value (``(16, 16)``) makes that dim static
    dims: Optional[dict] = None
    #: trace with the example inputs' shapes, no symbolic dims (not for causal LMs)
    static: bool = False
    quant: Optional[str] = None
    #: int4 scale group (32, 64 or 128); None: per layer, the largest that divides its inputs
    quant_group: Optional[int] = None
    kv_cache_dtype: Optional[str] = None
    #: calibration prompts (text, or .json token-id lists); None: irlm's built-in set
    calib: Optional[Union[str, Path]] = None
    tp: int = 1
    pp: int = 1
    #: the device the engine is for: "cpu" records the dtype this CPU computes linears fastest
    #: in (engine config ``cpu_linear``); "any" or "cuda" record nothing
    device: str = "any"
    #: the dtype a CPU runs this engine's linears in (engine config ``cpu_linear``: f32, f16,
    #: bf16, int8, int4); None: with device "cpu", the fastest this CPU has for the quant mode
    cpu_linear: Optional[str] = None
    #: what to write: "engine" (irlm's), "onnx" (model.onnx + build_trt.sh) or "tensorrt"
    #: (also model.plan; needs TensorRT)
    target: str = "engine"
    #: write into a non-empty output directory that is not an earlier irlm output
    force: bool = False
    #: False stops after the pass pipeline (IR only)
    write_engine: bool = True
    #: trace 3 decoder layers and stamp the rest when they provably repeat (the same graph,
    #: faster; irlm.frontends.stamping); False traces every layer (``--no-stamp-layers``)
    stamp_layers: bool = True
    # ----- IR dumps and pass instrumentation (as irlm opt's flags) -----
    #: write the IR after every pass under output/ir/ (01-PASS.irlm, ...)
    dump_ir: bool = False
    #: where the per-pass dumps go instead of output/ir/
    dump_ir_dir: Optional[Union[str, Path]] = None
    print_ir_before: list[str] = field(default_factory=list)
    print_ir_after: list[str] = field(default_factory=list)
    timing: bool = False
    stats: bool = False
    check_numerics: bool = False
    numerics_atol: Optional[float] = None
    numerics_rtol: Optional[float] = None
    numerics_seed: int = 0
    numerics_int_max: Optional[int] = None
    verify_each: bool = True
    #: Python files that register passes (loaded before the pipeline is parsed)
    pass_plugins: list[Union[str, Path]] = field(default_factory=list)

    @property
    def splits(self) -> bool:
        """Whether the compile splits into ranks (and so quantizes after the split)."""
        return (self.tp or 1, self.pp or 1) != (1, 1)

    @property
    def element_dtype(self) -> str:
        """``dtype``, or when unset the device's: bf16 for an engine for a GPU (what its tensor
        cores and irlm's quantized GPU kernels take), f32 otherwise."""
        if self.dtype is not None:
            return self.dtype
        return "bf16" if self.device == "cuda" else "f32"

    @property
    def calibrates(self) -> bool:
        return self.quant in CALIBRATED or bool(self.kv_cache_dtype)

    def check(self) -> None:
        """Raise an :class:`IRLMError` naming the first bad setting."""
        if self.opt_level is not None and str(self.opt_level).lstrip("O") not in ("0", "1", "2"):
            raise IRLMError(f"-O{self.opt_level}: unknown optimization level "
                            f"(valid: -O0, -O1, -O2)")
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--quant", self.quant, QUANT_MODES)
        _choice("--kv-cache-dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _choice("--device", self.device, DEVICES)
        if self.cpu_linear is not None:
            from irlm.lowering.kernel_selection import LINEAR_DTYPES
            _choice("--cpu-linear", self.cpu_linear, LINEAR_DTYPES)
            if self.device == "cuda":
                raise IRLMError(f"--cpu-linear {self.cpu_linear} with --device cuda: the CPU "
                                f"linear dtype is for engines run on a CPU (use --device cpu "
                                f"or any)")
        _choice("--target", self.target, TARGETS)
        quant = self.quant
        if self.calib is not None:
            if not self.calibrates:
                raise IRLMError(f"--calib is only read by --quant {', '.join(CALIBRATED)} and "
                                f"--kv-cache-dtype; with "
                                f"{'--quant ' + quant if quant else 'no --quant'} "
                                f"nothing is calibrated")
            existing(self.calib, "--calib")
        if quant in ("int4", "int4-awq") and self.quant_group not in (None, *INT4_GROUPS):
            raise IRLMError(f"--quant-group {self.quant_group}: must be 32, 64 or 128")
        for flag, value in (("--max-batch", self.max_batch), ("--max-seq", self.max_seq),
                            ("--tokens-per-block", self.tokens_per_block),
                            ("--max-num-tokens", self.max_num_tokens), ("--tp", self.tp),
                            ("--pp", self.pp), ("--quant-group", self.quant_group)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise IRLMError(f"{flag} {value!r:.40}: must be a whole number")
        # batch 1 is a static batch; a sequence needs a prompt token and a generated one
        for flag, value, low in (("--max-batch", self.max_batch, 1),
                                 ("--max-seq", self.max_seq, 2)):
            if value is not None and value < low:
                raise IRLMError(f"{flag} {value}: must be at least {low}")
        for flag, value, top in (("--tokens-per-block", self.tokens_per_block, 4096),
                                 ("--max-num-tokens", self.max_num_tokens, 1 << 24)):
            if value is not None and not 1 <= value <= top:
                raise IRLMError(f"{flag} {value}: must be in [1, {top}]")
        self._check_dims()
        self._check_parallel()
        if self.target != "engine":
            from irlm.lowering.onnx.targets import check_target
            if self.splits:
                raise IRLMError(f"--target {self.target} writes one network: it does not take "
                                f"--tp/--pp")
            check_target(self.target)

    def _check_dims(self) -> None:
        if self.dims is None:
            return
        if self.static:
            raise IRLMError("--dims with --static: static shapes have no ranges; give one")
        if not isinstance(self.dims, dict):
            raise IRLMError(f"--dims: expected NAME=MIN:MAX pairs, got {self.dims!r:.60}")
        for name, r in self.dims.items():
            if name not in DIM_NAMES:
                raise IRLMError(f"--dims {name}=...: unknown dimension '{name}' (the traced "
                                f"dims are {' and '.join(DIM_NAMES)}: dim 0 and dim 1 of every "
                                f"input)")
            ok = isinstance(r, (tuple, list)) and len(r) == 2 and \
                all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            if not ok or not 1 <= r[0] <= r[1]:
                raise IRLMError(f"--dims {name}={_range_text(r)}: a range must be MIN:MAX with "
                                f"1 <= MIN <= MAX")

    def _check_parallel(self) -> None:
        for flag, value in (("--tp", self.tp), ("--pp", self.pp)):
            if value is not None and value < 1:
                raise IRLMError(f"{flag} {value}: must be at least 1")
        tp, pp = self.tp or 1, self.pp or 1
        if tp == 1 and pp == 1:
            return
        flag = " ".join(f for f in (f"--tp {tp}" if tp > 1 else "",
                                    f"--pp {pp}" if pp > 1 else "") if f)
        # The weight-only modes quantize each rank's graph after the split; the calibrated
        # ones would have to run the calibration prompts through all ranks at once.
        works = f"with {flag}, only the weight-only --quant {' and '.join(WEIGHT_ONLY)} work"
        if self.quant and self.quant not in WEIGHT_ONLY:
            raise IRLMError(f"{flag} with --quant {self.quant}: not supported together yet "
                            f"(its calibration would need all ranks); {works}")
        if self.kv_cache_dtype:
            raise IRLMError(f"{flag} with --kv-cache-dtype {self.kv_cache_dtype}: not supported "
                            f"together yet (its scales are calibrated on the whole model); "
                            f"{works}")


#: the traced dims: dim 0 (batch) and dim 1 (seq) of every input
DIM_NAMES = ("batch", "seq")


def _range_text(r) -> str:
    return f"{r[0]}:{r[1]}" if isinstance(r, (tuple, list)) and len(r) == 2 else repr(r)


def parse_dims(text: str) -> dict:
    """``"batch=1:8,seq=1:2048"`` (``seq=16``: static 16) → ``{"batch": (1, 8), ...}``."""
    out = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        lo, colon, hi = value.partition(":")
        try:
            r = (int(lo), int(hi)) if colon else (int(lo), int(lo))
        except ValueError:
            raise IRLMError(f"--dims {text}: '{item.strip()}' is not NAME=MIN:MAX (e.g. "
                            f"batch=1:8,seq=1:2048; seq=16 for a static size)") from None
        if not eq or not name:
            raise IRLMError(f"--dims {text}: '{item.strip()}' is not NAME=MIN:MAX")
        if name in out:
            raise IRLMError(f"--dims {text}: '{name}' is given twice")
        out[name] = r
    return out


def _choice(flag: str, value, valid) -> None:
    if value is not None and value not in valid:
        raise IRLMError(f"{flag} {value}: not one of {', '.join(valid)}")


def existing(path, flag: str) -> Path:
    """``path`` as a Path; an error naming ``flag`` when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise IRLMError(f"{flag} {path}: no such file or directory")
    return p
