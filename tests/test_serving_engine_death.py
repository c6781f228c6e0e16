"""`irlm serve` when its engine-core process dies: killed from outside (SIGKILL, as the OOM
killer does), a native crash inside a step (SIGSEGV) or a Python exception in a step.

Every request in flight (OpenAI streamed and not, KServe generate_stream, gRPC
ModelStreamInfer) gets an error naming the cause within seconds, new requests are refused at
once, the health endpoints say 503, and the server exits non-zero with the cause on one line,
leaving no process behind.  The engine is irlm.serving.proxy's (a step every 20 ms, no model),
so requests of 1000 tokens are surely in flight when the core goes."""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
grpcclient = pytest.importorskip("tritonclient.grpc")

from irlm.serving.testing import ServerProcess  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

POISON = [11, 22, 33]          # a prompt the crashing engine dies on, in its next step
FACTORY = f'''
import ctypes
import os

from irlm.serving.proxy import proxy_llm


def crashing_llm(**kw):
    """The proxy engine, whose step crashes ($IRLM_TEST_CRASH: segfault or exception) once a
    request with the prompt {POISON} is waiting."""
    llm = proxy_llm(**kw)
    engine, step = llm.engine, llm.engine.step

    def crashing_step():
        if any(r.prompt_ids == {POISON} for r in engine.scheduler.waiting):
            if os.environ["IRLM_TEST_CRASH"] == "segfault":
                ctypes.string_at(0)
            raise RuntimeError("injected failure in a step")
        return step()
    engine.step = crashing_step
    return llm
'''
LONG = 1000                    # tokens: 20 s at 20 ms a step


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None: no such
    process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()
            and (st := _stat(int(d))) is not None and int(st[1]) == pid]


def running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"       # a zombie has ended; only its parent is late


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class InFlight(threading.Thread):
    """Runs ``fn(started)`` in a thread; ``started()`` marks the request as under way (its
    first token arrived).  Keeps what it raised and when."""

    def __init__(self, name, fn):
        super().__init__(name=name, daemon=True)
        self.fn, self.started = fn, threading.Event()
        self.error, self.result, self.ended = None, None, None

    def run(self):
        try:
            self.result = self.fn(self.started.set)
        except BaseException as e:    # noqa: BLE001 - what the test looks at
            self.error = e
        self.ended = time.monotonic()
        self.started.set()


def _grpc_inputs(ids, n):
    ins = []
    for name, arr in [("input_ids", np.array([ids], np.int32)),
                      ("input_lengths", np.array([[len(ids)]], np.int32)),
                      ("request_output_len", np.array([[n]], np.int32)),
                      ("streaming", np.array([[True]], bool))]:
        i = grpcclient.InferInput(name, list(arr.shape), grpcclient.np_to_triton_dtype(arr.dtype))
        i.set_data_from_numpy(arr)
        ins.append(i)
    return ins


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "segfault", "exception"])
def test_engine_core_death_fails_requests_and_stops_the_server(how, tmp_path):
    factory = tmp_path / "crashing_factory.py"
    factory.write_text(FACTORY)
    # a grace long enough for the probes below on a loaded 2-core machine (default 1 s)
    env = {"IRLM_PROXY_STEP_MS": "20", "IRLM_PROXY_TOKENIZER": "tiny", "IRLM_TEST_CRASH": how,
           "IRLM_SERVE_FAILURE_GRACE": "6"}
    with ServerProcess(["--factory", f"{factory}:crashing_llm", "--served-model-name", "m",
                        "--drain-timeout", "2"], env=env, timeout=120) as srv:
        kids = children(srv.proc.pid)
        (core,) = [p for p in kids if "spawn_main" in cmdline(p)
                   and "resource_tracker" not in cmdline(p)]
        expected = {"sigkill": f"the engine core process (pid {core}) died: killed by signal "
                               f"SIGKILL",
                    "segfault": f"the engine core process (pid {core}) died: killed by signal "
                                f"SIGSEGV",
                    "exception": "the engine core failed: RuntimeError: injected failure in "
                                 "a step"}[how]
        oai = openai.OpenAI(base_url=srv.openai_url, api_key="-", max_retries=0, timeout=20)

        def openai_stream(started):
            for ev in oai.completions.create(model="m", prompt="hi", max_tokens=LONG,
                                             stream=True):
                started()
            return "ended without an error"

        def openai_plain(started):
            started()
            return oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=LONG)

        def kserve_stream(started):
            with httpx.stream("POST", srv.url + "/v2/models/m/generate_stream",
                              json={"text_input": "hi", "max_tokens": LONG},
                              timeout=20) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started()
                return events[-1]

        def grpc_stream(started):
            q: queue.Queue = queue.Queue()
            c = grpcclient.InferenceServerClient(srv.grpc_addr)
            c.start_stream(callback=lambda result, error: q.put(error))
            try:
                c.async_stream_infer("tensorrt_llm", _grpc_inputs([5, 6, 7], LONG))
                while True:
                    error = q.get(timeout=20)
                    started()
                    if error is not None:
                        raise error
            finally:
                c.stop_stream(cancel_requests=True)

        flights = [InFlight(fn.__name__, fn)
                   for fn in (openai_stream, openai_plain, kserve_stream, grpc_stream)]
        for f in flights:
            f.start()
        for f in flights:
            assert f.started.wait(20), f"{f.name} did not start"
            assert f.error is None, f"{f.name} failed before the engine did: {f.error!r}"
        time.sleep(0.2)                        # the plain request reached the core too

        t0 = time.monotonic()
        if how == "sigkill":
            os.kill(core, signal.SIGKILL)
        else:
            poison = InFlight("poison", lambda started: oai.completions.create(
                model="m", prompt=POISON, max_tokens=4))
            poison.start()
            flights.append(poison)

        # from the moment the server knows: unhealthy, and new requests refused at once
        while True:
            r = httpx.get(srv.url + "/health", timeout=5)
            if r.status_code != 200 or time.monotonic() - t0 > 5:
                break
            time.sleep(0.02)
        assert r.status_code == 503 and r.json()["error"] == expected
        assert httpx.get(srv.url + "/v2/health/ready", timeout=5).status_code == 503
        assert httpx.get(srv.url + "/v2/health/live", timeout=5).status_code == 503
        t_new = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            oai.completions.create(model="m", prompt="hello", max_tokens=4)
        assert time.monotonic() - t_new < 2
        assert e.value.status_code == 503 and e.value.body["message"] == expected

        # every request in flight ended with the cause, within seconds
        for f in flights:
            f.join(10)
            assert not f.is_alive(), f"{f.name} still waits"
            assert f.ended - t0 < 5, f"{f.name} took {f.ended - t0:.1f} s to fail"
        errors = {f.name: f.error for f in flights}
        assert isinstance(errors["openai_stream"], openai.APIError)
        assert errors["openai_stream"].message == expected
        assert isinstance(errors["openai_plain"], openai.InternalServerError)
        assert errors["openai_plain"].body["message"] == expected
        assert flights[2].error is None and flights[2].result == \
            f'data: {{"error": "{expected}"}}'
        assert expected in str(errors["grpc_stream"])
        if how != "sigkill":
            assert isinstance(errors["poison"], openai.InternalServerError)
            assert errors["poison"].body["message"] == expected

        # the server stops by itself, non-zero, with the cause as its last word
        rc = srv.proc.wait(timeout=30)
        assert rc != 0 and time.monotonic() - t0 < 30
        srv.log.seek(0)
        log = srv.log.read()
        assert log.strip().splitlines()[-1] == f"irlm: error: {expected}", log
        assert "Traceback" not in log and "never retrieved" not in log, log

    deadline = time.monotonic() + 5
    while any(running(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [(p, cmdline(p)) for p in kids if running(p)]


@pytest.mark.slow
def test_clients_that_give_up_leave_no_noise_in_the_log():
    """A client that stops waiting for a plain (not streamed) completion aborts it; the
    server's log stays clean (asyncio used to report the cancelled gather of its streams as
    an "exception was never retrieved")."""
    env = {"IRLM_PROXY_STEP_MS": "20", "IRLM_PROXY_TOKENIZER": "tiny"}
    with ServerProcess(["--factory", "irlm.serving.proxy:proxy_llm", "--served-model-name",
                        "m"], env=env, grpc=False) as srv:
        for path, body in [("/v1/completions", {"prompt": "hi", "max_tokens": LONG}),
                           ("/v1/chat/completions", {"messages": [
                               {"role": "user", "content": "hi"}], "max_tokens": LONG})]:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + path, json={"model": "m", **body}, timeout=0.5)
        time.sleep(0.5)                 # the server sees the disconnections
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
    assert srv.returncode == 0
    srv.log.seek(0)
    log = srv.log.read()
    assert "never retrieved" not in log and "Traceback" not in log, log
