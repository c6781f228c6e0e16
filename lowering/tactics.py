"""Tactic selection: which of several kernels that compute the same op runs it, decided by
timing them on the device when the runner loads an engine (as TensorRT times its tactics when
it builds one).

A row limit fixed from one machine's benchmark (``quant_linear.GEMV_MAX_M`` and its kin) is
right for that machine and shape; the fastest kernel for a batch-1 decode linear depends on
the GPU, the weight's shape and its dtype.  :func:`choose` times each candidate, a closure
that runs the op over every weight of one shape in the engine (for a model of a few GB more
bytes than the L2 cache holds, as a decode step reads them), replayed as a CUDA graph as a
decode step runs it, and returns the fastest.  A candidate must beat the
default (the path the runner would take without timing) by :data:`MIN_GAIN` to replace it, so
that timing noise does not flip the choice between loads.

Choices are kept per process and device, keyed by what the caller names (path family, shape,
dtype): a second engine of the same model in the process does not time again.
``IRLM_TACTICS=0`` in the environment turns timing off: every op takes its default, as before
this module existed (for bit-reproducible runs across machines, or to compare).
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Callable, Optional

#: a non-default candidate must be at least this much faster than the default to be chosen
MIN_GAIN = 0.03
#: the row counts a linear's small-batch paths are timed at: the CUDA runner's decode graph
#: buckets up to 8 (a decode step of 3 requests runs the bucket-4 graph, 4 rows)
SMALL_ROWS = (1, 2, 4, 8)
#: timed calls per candidate (interleaved across candidates), after WARMUP untimed ones
REPS = 7
WARMUP = 2

Timer = Callable[[dict], dict]
_CHOICES: dict = {}          # (device, key) -> Choice


class Choice:
    """What :func:`choose` decided for one key: the chosen candidate, each candidate's median
    time in microseconds (empty when nothing was timed) and why."""

    def __init__(self, chosen: str, times_us: dict, why: str):
        self.chosen, self.times_us, self.why = chosen, dict(times_us), why

    def __repr__(self) -> str:
        times = ", ".join(f"{k} {v:.1f} us" for k, v in self.times_us.items())
        return f"{self.chosen} ({self.why}{': ' + times if times else ''})"


def enabled() -> bool:
    return os.environ.get("IRLM_TACTICS", "1").strip().lower() not in ("0", "off", "false",
                                                                         "no")


def resolve_device(device):
    """``device`` as a torch.device with its index: ``"cuda"`` is the current CUDA device
    (torch does not count ``cuda`` and ``cuda:0`` as equal)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(tensor, device) -> bool:
    """Whether ``tensor`` lives on ``device`` (a CPU tensor on any ``cpu`` / ``cpu:N``)."""
    device = resolve_device(device)
    if tensor.device.type != device.type:
        return False
    return device.type != "cuda" or tensor.device.index == device.index


def cuda_timer(candidates: dict) -> dict:
    """Median microseconds of each candidate closure on the current CUDA device.  Each is
    captured once in a CUDA graph (after warm-up calls on a side stream, which also load its
    kernels) and the replays are timed with CUDA events, since a decode step runs them as graph
    replays: eager timing would also count each launch's host work (Python argument checks for
    irlm's kernels), which a replay does not pay.  The candidates are interleaved replay by
    replay so that clock and thermal drift reach them alike.  A candidate that cannot be
    captured makes every candidate be timed eagerly instead; one that raises when called is
    reported as infinitely slow (never chosen), with a warning."""
    import warnings

    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    failed = {}
    with torch.cuda.stream(side):
        for name, fn in candidates.items():
            try:
                for _ in range(WARMUP):
                    fn()
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run: not a choice
                failed[name] = e
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name, e in failed.items():
        warnings.warn(f"tactic {name!r} failed while being timed ({type(e).__name__}: {e}); "
                      f"it is not used", RuntimeWarning, stacklevel=3)
    candidates = {n: fn for n, fn in candidates.items() if n not in failed}
    runs = {}
    try:
        for name, fn in candidates.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            runs[name] = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time the plain calls
        torch.cuda.synchronize()
        runs = dict(candidates)
    times = {name: [] for name in runs}
    for _ in range(REPS):
        for name, run in runs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1000.0)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    return {**out, **{name: math.inf for name in failed}}


def choose(device, key, candidates: dict, default: str,
           timer: Optional[Timer] = None) -> Choice:
    """The candidate (a name in ``candidates``: name -> zero-argument closure) to run the ops
    that ``key`` names on ``device``; ``default`` is one of them.  Timed once per process,
    device and key (:func:`cuda_timer` unless ``timer`` is given)."""
    if default not in candidates:
        raise ValueError(f"default {default!r} is not among the candidates {list(candidates)}")
    if len(candidates) == 1:
        return Choice(default, {}, "the only candidate")
    if not enabled():
        return Choice(default, {}, "IRLM_TACTICS=0")
    device = resolve_device(device)
    cache_key = (str(device), key)
    hit = _CHOICES.get(cache_key)
    if hit is not None and hit.chosen in candidates:
        return hit
    if timer is None and device.type == "cuda":
        import torch
        with torch.cuda.device(device):     # events and syncs on the device timed
            times = cuda_timer(candidates)
    else:
        times = (timer or cuda_timer)(candidates)
    best = min(times, key=times.get)
    if math.isinf(times[best]):
        choice = Choice(default, times, "no candidate ran")
    elif best != default and times[best] > times[default] * (1.0 - MIN_GAIN):
        choice = Choice(default, times, f"no candidate {MIN_GAIN:.0%} faster than the default")
    else:
        choice = Choice(best, times, "fastest" if best != default else "the default is fastest")
    _CHOICES[cache_key] = choice
    return choice


def forget() -> None:
    """Drop every kept choice (tests; a process that changed its GPU clocks)."""
    _CHOICES.clear()
