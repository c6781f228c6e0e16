"""kernels/CMakeLists.txt builds libirlm_kernels.so from the same sources and the same
template instantiations as the NVRTC path.

CPU (CI: nvcc and cmake are on every machine): configure + build for sm_90a, load the library
with ctypes, and compare its kernel table with irlm.kernels.ops.all_kernels()'s name
expressions.  GPU (the device): the GPU kernel tests (tests/test_kernels_gpu.py) run again with
every launch routed through the library's C ABI (tests/kernel_library_launch.py), so each
entry point is checked against the same oracles as the NVRTC-compiled kernel.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory) -> Path:
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc and cmake are needed to build kernels/CMakeLists.txt")
    build = tmp_path_factory.mktemp("kernels-build")
    cfg = subprocess.run(["cmake", "-S", str(ROOT / "kernels"), "-B", str(build),
                          "-DCMAKE_CUDA_ARCHITECTURES=90a",
                          f"-DPython3_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    assert "building libirlm_kernels.so alone" in cfg.stdout or "TensorRT found" in cfg.stdout
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    b = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True,
                       text=True, timeout=1200)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    lib = build / "libirlm_kernels.so"
    assert lib.is_file()
    return lib


@pytest.mark.slow
def test_library_holds_every_kernel_the_nvrtc_path_compiles(kernel_library):
    from irlm.kernels.ops import all_kernels
    lib = ctypes.CDLL(str(kernel_library))
    lib.irlm_kernel_name.restype = ctypes.c_char_p
    lib.irlm_kernel_function.restype = ctypes.c_void_p
    lib.irlm_kernel_function.argtypes = [ctypes.c_char_p]
    lib.irlm_launch_kernel.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
        ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
    assert lib.irlm_kernels_abi_version() == 1
    names = [lib.irlm_kernel_name(i).decode() for i in range(lib.irlm_kernel_count())]
    want = {n for k in all_kernels() for n in k.names}
    assert len(names) == len(set(names))
    assert set(names) == want
    for n in names:
        assert lib.irlm_kernel_function(n.encode())
    assert lib.irlm_kernel_function(b"irlm_no_such_kernel<float>") is None
    assert lib.irlm_launch_kernel(b"irlm_no_such_kernel<float>", 1, 1, 1, 1, 1, 1, 0,
                                  None, None) == -1


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_kernel_tests_pass_through_the_library(kernel_library, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    count = tmp_path / "launches"
    env = dict(os.environ, IRLM_TEST_KERNEL_LIBRARY=str(kernel_library),
               IRLM_TEST_KERNEL_LAUNCHES=str(count),
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "kernel_library_launch",
                        str(ROOT / "tests" / "test_kernels_gpu.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert int(count.read_text()) > 0
