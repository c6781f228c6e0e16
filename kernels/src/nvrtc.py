"""Compile ``kernels/*.cu`` with NVRTC, cache the cubins on disk, load and launch them.

* :func:`compile_source` compiles one source file for one architecture (``sm_90a`` on Hopper,
  read from torch's view of the current GPU, or given explicitly) with a set of template
  instantiations (NVRTC "name expressions") and returns the cubin with the mangled names.
  Options: ``-std=c++17 -default-device -I<kernels dir>`` and ``--use_fast_math`` unless the
  kernel asks for exact math (rotary embeddings).  Failures raise :class:`KernelCompileError`
  carrying NVRTC's log.
* Cubins are cached under ``~/.cache/irlm/kernels`` (``$IRLM_CACHE_DIR/kernels`` when that is
  set), keyed by the SHA-256 of the source, every header of the kernels folder, the options, the
  name expressions and the NVRTC version.
* :class:`Kernel` loads a compiled module into the current device's primary context
  (``cuModuleLoadData``), looks functions up, raises the dynamic shared-memory limit when a
  launch needs more than 48 KiB and launches on torch's current stream, with the kernel's
  parameter block given as one ``ctypes.Structure`` (every irlm kernel takes one struct by
  value).  Launches are asynchronous and can be captured in CUDA graphs; on sm_90+ they use
  programmatic dependent launch (``cuLaunchKernelEx``, below).

Nothing here imports ``cuda.bindings`` until it is needed: ``import irlm`` works without
cuda-python, and the compiler works without a GPU (CI compiles every kernel on the CPU).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import IRLMError

KERNEL_DIR = Path(__file__).resolve().parent


class KernelError(IRLMError):
    """Base class of the kernel package's errors."""


class KernelUnavailableError(KernelError):
    """cuda-python / NVRTC / the driver / a GPU is missing."""


class KernelCompileError(KernelError):
    """NVRTC rejected a kernel source; ``log`` holds NVRTC's log."""

    def __init__(self, source: str, log: str, options: Sequence[str]):
        self.source, self.log, self.options = source, log, list(options)
        super().__init__(f"NVRTC failed to compile {source} ({' '.join(options)}):\n{log}")


class KernelArgumentError(KernelError, ValueError):
    """A launcher got tensors of the wrong shape, dtype, device or layout."""


class KernelLaunchError(KernelError):
    """The driver refused to load or launch a kernel."""


# ---- lazy imports -------------------------------------------------------------------------------
def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except Exception as e:  # ImportError, or the library failing to load
        raise KernelUnavailableError(
            "compiling kernels needs cuda-python's NVRTC bindings: pip install 'irlm[cuda]' "
            f"(cuda-python and nvidia-cuda-nvrtc) ({type(e).__name__}: {e})") from e
    return nvrtc


def _driver():
    try:
        from cuda.bindings import driver
    except Exception as e:
        raise KernelUnavailableError(
            f"launching kernels needs cuda-python: pip install 'irlm[cuda]' ({e})") from e
    return driver


def _check_nvrtc(result, what: str):
    nvrtc = _nvrtc()
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise KernelError(f"{what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def _check_cu(result, what: str):
    cu = _driver()
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        _, msg = cu.cuGetErrorString(err)
        msg = msg.decode() if isinstance(msg, bytes) else msg
        raise KernelLaunchError(f"{what} failed: {err.name}: {msg}")
    return result[1] if len(result) == 2 else (result[1:] if len(result) > 2 else None)


def nvrtc_available() -> tuple[bool, str]:
    """(True, version) when NVRTC can be loaded here, else (False, the reason)."""
    try:
        return True, "%d.%d" % nvrtc_version()
    except Exception as e:  # noqa: BLE001 - report any failure to load
        return False, str(e)


_VERSION: Optional[tuple[int, int]] = None


def nvrtc_version() -> tuple[int, int]:
    global _VERSION
    if _VERSION is None:
        _VERSION = tuple(_check_nvrtc(_nvrtc().nvrtcVersion(), "nvrtcVersion"))
    return _VERSION


# ---- architectures ------------------------------------------------------------------------------
def arch_for_capability(major: int, minor: int) -> str:
    """``sm_90a`` for Hopper (its arch-specific features), ``sm_XY`` otherwise."""
    if (major, minor) < (8, 0):
        raise KernelUnavailableError(
            f"irlm's kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async); "
            f"this GPU is {major}.{minor}")
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def current_arch(device=None) -> str:
    import torch
    if not torch.cuda.is_available():
        raise KernelUnavailableError("no CUDA GPU is visible to torch; pass arch= explicitly")
    return arch_for_capability(*torch.cuda.get_device_capability(device))


# ---- compilation --------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("IRLM_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "irlm"
    return base / "kernels"


def compile_options(arch: str, fast_math: bool = True,
                    extra: Sequence[str] = ()) -> list[str]:
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "-default-device",
            f"-I{KERNEL_DIR}", "-DIRLM_NVRTC=1"]
    if fast_math:
        opts.append("--use_fast_math")
    return opts + list(extra)


def _headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*.cuh")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class CompiledModule:
    """A cubin and the mangled ("lowered") names of its instantiated kernels."""
    filename: str
    arch: str
    key: str
    cubin: bytes
    names: dict[str, str]
    log: str = ""
    from_cache: bool = False


_MEM_CACHE: dict[str, CompiledModule] = {}
_LOCK = threading.Lock()


def cache_key(filename: str, source: str, name_expressions: Sequence[str],
              options: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in (filename, source, _headers_digest(), "\n".join(name_expressions),
                 # the -I path differs between checkouts; it does not change the code
                 "\n".join(o for o in options if not o.startswith("-I")),
                 "nvrtc %d.%d" % nvrtc_version()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def compile_source(filename: str, name_expressions: Sequence[str], *, arch: Optional[str] = None,
                   fast_math: bool = True, extra_options: Sequence[str] = (),
                   source: Optional[str] = None, use_disk_cache: bool = True) -> CompiledModule:
    """Compile ``kernels/<filename>`` (or ``source``) instantiating ``name_expressions``.

    ``arch`` defaults to the current GPU's (``sm_90a`` on Hopper); give it to compile without a
    GPU.  Raises :class:`KernelCompileError` with NVRTC's log when the source does not compile.
    """
    if source is None:
        path = KERNEL_DIR / filename
        if not path.is_file():
            raise KernelError(f"no kernel source {path}")
        source = path.read_text()
    arch = arch or current_arch()
    options = compile_options(arch, fast_math, extra_options)
    names = list(name_expressions)
    key = cache_key(filename, source, names, options)
    with _LOCK:
        hit = _MEM_CACHE.get(key)
    if hit is not None:
        return hit
    cdir = cache_dir()
    if use_disk_cache:
        cub, meta = cdir / f"{key}.cubin", cdir / f"{key}.json"
        if cub.is_file() and meta.is_file():
            try:
                info = json.loads(meta.read_text())
                mod = CompiledModule(filename, arch, key, cub.read_bytes(), info["names"],
                                     info.get("log", ""), from_cache=True)
                if set(mod.names) == set(names):
                    with _LOCK:
                        _MEM_CACHE[key] = mod
                    return mod
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry: compile again and overwrite it
    mod = _nvrtc_compile(filename, source, names, options, arch, key)
    if use_disk_cache:
        _write_cache(cdir, mod)
    with _LOCK:
        _MEM_CACHE[key] = mod
    return mod


def _nvrtc_compile(filename, source, names, options, arch, key) -> CompiledModule:
    nvrtc = _nvrtc()
    prog = _check_nvrtc(nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []),
                        "nvrtcCreateProgram")
    try:
        for n in names:
            _check_nvrtc(nvrtc.nvrtcAddNameExpression(prog, n.encode()), "nvrtcAddNameExpression")
        opts = [o.encode() for o in options]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        size = _check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check_nvrtc(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(filename, log, options)
        size = _check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        if size == 0:
            raise KernelCompileError(filename, log + "\n(NVRTC produced no cubin: is the "
                                     "architecture a real one, sm_XY?)", options)
        cubin = b" " * size
        _check_nvrtc(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = {}
        for n in names:
            low = _check_nvrtc(nvrtc.nvrtcGetLoweredName(prog, n.encode()), "nvrtcGetLoweredName")
            lowered[n] = low.decode() if isinstance(low, bytes) else str(low)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompiledModule(filename, arch, key, cubin, lowered, log)


def _write_cache(cdir: Path, mod: CompiledModule) -> None:
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".cubin", mod.cubin),
                             (".json", json.dumps({"file": mod.filename, "arch": mod.arch,
                                                   "names": mod.names, "log": mod.log}).encode())):
            fd, tmp = tempfile.mkstemp(dir=cdir, prefix=f".{mod.key[:16]}", suffix=suffix)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, cdir / f"{mod.key}{suffix}")  # atomic: readers never see half a file
    except OSError:
        pass  # a read-only or full cache directory only costs a recompile next time


# ---- loading and launching ----------------------------------------------------------------------
@dataclass
class _Loaded:
    module: object
    functions: dict = field(default_factory=dict)
    smem_limit: dict = field(default_factory=dict)


_LOADED: dict[tuple[str, int], _Loaded] = {}
_INITIALISED = False


def _ensure_context(device_index: int):
    """Make the device's primary context (the one torch uses) current on this thread."""
    global _INITIALISED
    cu = _driver()
    if not _INITIALISED:
        _check_cu(cu.cuInit(0), "cuInit")
        _INITIALISED = True
    ctx = _check_cu(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is None or int(ctx) == 0:
        dev = _check_cu(cu.cuDeviceGet(device_index), "cuDeviceGet")
        ctx = _check_cu(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check_cu(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class Kernel:
    """One source file's group of template instantiations, compiled lazily and loaded per device.

    ``Kernel("rms_norm.cu", [...name expressions...])``; ``launch(name, grid, block, params)``
    where ``params`` is the ``ctypes.Structure`` the kernel takes by value.
    """

    def __init__(self, filename: str, name_expressions: Iterable[str], fast_math: bool = True,
                 programmatic: bool = True):
        self.filename = filename
        self.names = tuple(name_expressions)
        self.fast_math = fast_math
        # launched with programmatic stream serialization where the device has it (see
        # programmatic_launch_enabled); False: always plainly, for kernels measured slower so
        self.programmatic = programmatic
        self._modules: dict[str, CompiledModule] = {}

    def compile(self, arch: Optional[str] = None) -> CompiledModule:
        arch = arch or current_arch()
        mod = self._modules.get(arch)
        if mod is None:
            mod = compile_source(self.filename, self.names, arch=arch, fast_math=self.fast_math)
            self._modules[arch] = mod
        return mod

    def function(self, name: str, device_index: int):
        if name not in self.names:
            raise KernelError(f"{name} is not one of {self.filename}'s instantiations")
        import torch
        arch = arch_for_capability(*torch.cuda.get_device_capability(device_index))
        mod = self.compile(arch)
        key = (mod.key, device_index)
        loaded = _LOADED.get(key)
        cu = _driver()
        if loaded is None:
            _ensure_context(device_index)
            handle = _check_cu(cu.cuModuleLoadData(mod.cubin), f"cuModuleLoadData({self.filename})")
            loaded = _LOADED.setdefault(key, _Loaded(handle))
        fn = loaded.functions.get(name)
        if fn is None:
            fn = _check_cu(cu.cuModuleGetFunction(loaded.module, mod.names[name].encode()),
                           f"cuModuleGetFunction({name})")
            loaded.functions[name] = fn
        return fn, loaded

    def launch(self, name: str, grid, block, params: ctypes.Structure, *, smem: int = 0,
               device=None) -> None:
        import torch
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return self.launch(name, grid, block, params, smem=smem, device=dev)
        fn, loaded = self.function(name, index)
        cu = _driver()
        if smem > 48 * 1024 and loaded.smem_limit.get(name, 0) < smem:
            _check_cu(cu.cuFuncSetAttribute(
                fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                f"cuFuncSetAttribute({name}, dynamic shared memory {smem})")
            loaded.smem_limit[name] = smem
        grid = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
        block = tuple(int(x) for x in block) + (1,) * (3 - len(block))
        if min(grid) <= 0:
            return  # nothing to do (empty batch)
        raw_stream = torch.cuda.current_stream(index).cuda_stream
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        if self.programmatic and programmatic_launch_enabled(index):
            config = _launch_config(grid, block, int(smem), raw_stream)
            _check_cu(cu.cuLaunchKernelEx(config, fn, ctypes.addressof(args), 0),
                      f"cuLaunchKernelEx({name}, grid={grid}, block={block}, smem={smem})")
            return
        _check_cu(cu.cuLaunchKernel(fn, *grid, *block, int(smem), cu.CUstream(raw_stream),
                                    ctypes.addressof(args), 0),
                  f"cuLaunchKernel({name}, grid={grid}, block={block}, smem={smem})")


# ---- programmatic dependent launch ------------------------------------------------------------
# On sm_90 and later every irlm kernel is launched with programmatic stream serialization: it
# may start while the previous kernel of the stream still runs, and waits for it inside
# (pdl_enter() in common.cuh, the first statement of every kernel).  A decode step is a chain of
# a few hundred short kernels, so this hides each launch behind its predecessor (1.5-3% of a
# batch-1 step on an H100, docs/performance.md).  CUDA graph capture keeps the relation as a
# programmatic edge.  IRLM_PDL=0, or set_programmatic_launch(False), launches plainly (for
# comparison; graphs captured before a change keep what they were captured with).

_PDL_OVERRIDE: Optional[bool] = None
_PDL_CAPABLE: dict[int, bool] = {}
_CONFIGS: dict = {}


def set_programmatic_launch(enabled: Optional[bool]) -> None:
    """Force programmatic dependent launch on or off for later launches; None: the default
    (on for sm_90+ unless ``IRLM_PDL=0``)."""
    global _PDL_OVERRIDE
    _PDL_OVERRIDE = enabled


def programmatic_launch_enabled(device_index: int) -> bool:
    """Whether launches on this device use programmatic stream serialization."""
    if _PDL_OVERRIDE is False:
        return False
    if _PDL_OVERRIDE is None and os.environ.get("IRLM_PDL", "1") == "0":
        return False
    capable = _PDL_CAPABLE.get(device_index)
    if capable is None:
        import torch
        capable = torch.cuda.get_device_capability(device_index)[0] >= 9
        _PDL_CAPABLE[device_index] = capable
    return capable


def _launch_config(grid, block, smem: int, raw_stream: int):
    """A cached CUlaunchConfig with the programmatic-serialization attribute (building one costs
    more host time than the launch itself)."""
    key = (grid, block, smem, raw_stream)
    entry = _CONFIGS.get(key)
    if entry is None:
        cu = _driver()
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = block
        config.sharedMemBytes = smem
        config.hStream = cu.CUstream(raw_stream)
        config.attrs = [attr]
        config.numAttrs = 1
        if len(_CONFIGS) > 4096:        # many distinct shapes (eager steps of varied lengths)
            _CONFIGS.clear()
        entry = _CONFIGS[key] = (config, attr)     # the attribute kept alive with its config
    return entry[0]


def precompile(kernels: Sequence[Kernel], arch: Optional[str] = None,
               workers: Optional[int] = None) -> list[CompiledModule]:
    """Compile many kernels at once (NVRTC releases the GIL, so threads overlap), filling the
    in-memory and disk caches; returns the compiled modules in order."""
    arch = arch or current_arch()
    workers = workers or min(len(kernels), os.cpu_count() or 1) or 1
    if workers == 1:
        return [k.compile(arch) for k in kernels]
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda k: k.compile(arch), kernels))
