"""A pytest plugin (``-p kernel_library_launch``) that routes every kernel launch of
irlm.kernels through the CMake-built ``libirlm_kernels.so`` (its C ABI) instead of the
NVRTC-compiled modules, so the GPU kernel tests check the library's entry points against
their oracles.  $IRLM_TEST_KERNEL_LIBRARY names the library; the launch count is written to
$IRLM_TEST_KERNEL_LAUNCHES at exit (a test that launched nothing proves nothing).
"""
import atexit
import ctypes
import os

from irlm.kernels import nvrtc as compiler

_lib = ctypes.CDLL(os.environ["IRLM_TEST_KERNEL_LIBRARY"])
_lib.irlm_launch_kernel.restype = ctypes.c_int
_lib.irlm_launch_kernel.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
_launches = [0]


def _launch(self, name, grid, block, params, *, smem=0, device=None):
    import torch
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    grid = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    block = tuple(int(x) for x in block) + (1,) * (3 - len(block))
    if min(grid) <= 0:
        return
    with torch.cuda.device(index):
        stream = torch.cuda.current_stream(index).cuda_stream
        rc = _lib.irlm_launch_kernel(name.encode(), *grid, *block, int(smem), stream,
                                     ctypes.addressof(params))
    if rc != 0:
        raise RuntimeError(f"libirlm_kernels.so: launching {name} returned {rc}")
    _launches[0] += 1


compiler.Kernel.launch = _launch


@atexit.register
def _report():
    path = os.environ.get("IRLM_TEST_KERNEL_LAUNCHES")
    if path:
        with open(path, "w") as f:
            f.write(str(_launches[0]))
