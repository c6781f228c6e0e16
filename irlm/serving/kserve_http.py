"""KServe v2 over HTTP, as Triton serves it: health, server and model metadata, model config,
``infer`` (JSON and the binary tensor extension that tritonclient uses by default), and the
``generate`` / ``generate_stream`` extension with the TensorRT-LLM ensemble's fields."""
from __future__ import annotations

import asyncio
import json
from typing import Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from .errors import ServingError, bad_field
from .kserve_tensors import (ENSEMBLE_MODEL, EXTENSIONS, NP_DTYPES, TRTLLM_MODEL,
                             concat_batch, deserialize_bytes, io_spec, model_config,
                             model_kind, np_datatype, parse_jobs, result_tensors, run_job,
                             serialize_bytes)

HEADER_LEN = "Inference-Header-Content-Length"
def tensor_from_json(inp: dict, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """One input of an infer request (JSON data or binary data at ``offset``)."""
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise bad_field("inputs", "each input needs a name, shape and datatype")
    name = inp["name"]
    dt, shape = inp.get("datatype"), inp.get("shape")
    if dt not in NP_DTYPES:
        raise bad_field(f"inputs[{name}].datatype", f"unknown datatype {dt!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad_field(f"inputs[{name}].shape", f"must be a list of sizes, got {shape!r}")
    count = int(np.prod(shape)) if shape else 1
    size = (inp.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        raw = bytes(binary[offset:offset + size])
        if len(raw) != size:
            raise bad_field(f"inputs[{name}]", "binary data shorter than binary_data_size")
        offset += size
        if dt == "BYTES":
            arr = np.array(deserialize_bytes(raw, name), dtype=np.object_)
        else:
            arr = np.frombuffer(raw, dtype=NP_DTYPES[dt])
    else:
        data = inp.get("data")
        if data is None:
            raise bad_field(f"inputs[{name}].data", "is required (or binary_data_size)")
        flat = np.array(data, dtype=object).reshape(-1).tolist()
        if dt == "BYTES":
            arr = np.array([s.encode() if isinstance(s, str) else bytes(s) for s in flat],
                           dtype=np.object_)
        else:
            try:
                arr = np.array(flat, dtype=NP_DTYPES[dt])
            except (TypeError, ValueError):
                raise bad_field(f"inputs[{name}].data", f"does not hold {dt} values") from None
    if arr.size != count:
        raise bad_field(f"inputs[{name}]", f"has {arr.size} elements, shape {shape} needs "
                                           f"{count}")
    return name, arr.reshape(shape), offset


def generate_tensors(body: dict, known=None) -> dict:
    """The generate extension's JSON fields as [1, ...] input tensors.  Fields under
    "parameters" are request parameters: those named in ``known`` (the model's inputs) are
    taken as inputs, the others ignored as Triton's models ignore parameters they do not
    read."""
    if not isinstance(body, dict):
        raise bad_field("body", "must be a JSON object")
    out = {}
    for k, v in body.items():
        if k in ("id", "parameters"):
            continue
        if isinstance(v, str):
            out[k] = np.array([[v.encode()]], dtype=np.object_)
        elif isinstance(v, list) and all(isinstance(s, str) for s in v):
            out[k] = np.array([[s.encode() for s in v]] if v else [[]], dtype=np.object_)
        elif isinstance(v, bool):
            out[k] = np.array([[v]], dtype=np.bool_)
        elif isinstance(v, int):
            out[k] = np.array([[v]], dtype=np.int64)
        elif isinstance(v, float):
            out[k] = np.array([[v]], dtype=np.float64)
        elif isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                         for x in v):
            out[k] = np.array([v])
        else:
            raise bad_field(k, f"unsupported value {v!r}")
    params = body.get("parameters")
    if isinstance(params, dict):          # Triton also takes fields as "parameters"
        taken = {k: v for k, v in params.items() if known is None or k in known}
        for k, v in generate_tensors(taken).items():
            out.setdefault(k, v)
    return out


def json_outputs(model: str, version: str, res: dict) -> dict:
    """Result tensors as the generate extension's JSON (scalars unwrapped)."""
    out = {"model_name": model, "model_version": version}
    for k, a in res.items():
        flat = a.reshape(-1).tolist()
        flat = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in flat]
        out[k] = flat[0] if len(flat) == 1 else flat
    return out


class KServeHTTP:
    def __init__(self, client, cfg):
        self.client, self.cfg = client, cfg

    def router(self) -> APIRouter:
        r = APIRouter()
        add = r.add_api_route
        add("/v2", self.server_metadata, methods=["GET"])
        add("/v2/health/live", self.live, methods=["GET"])
        add("/v2/health/ready", self.ready, methods=["GET"])
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add(base, self.model_metadata, methods=["GET"])
            add(base + "/ready", self.model_ready, methods=["GET"])
            add(base + "/config", self.config, methods=["GET"])
            add(base + "/stats", self.stats, methods=["GET"])
            add(base + "/infer", self.infer, methods=["POST"])
            add(base + "/generate", self.generate, methods=["POST"])
            add(base + "/generate_stream", self.generate_stream, methods=["POST"])
        add("/v2/repository/index", self.index, methods=["POST"])
        return r

    # ----- health and metadata --------------------------------------------------------------
    async def server_metadata(self):
        return {"name": "irlm", "version": __version__, "extensions": EXTENSIONS}

    async def live(self):
        return Response(status_code=200 if self.client.failure is None else 503)

    async def ready(self):
        ok = self.client.info is not None and not self.client.draining and \
            self.client.failure is None
        return Response(status_code=200 if ok else 503)

    def _kind(self, model: str, version: Optional[str]) -> str:
        kind = model_kind(model, self.cfg.served_model_name)
        if version not in (None, "", self.cfg.model_version):
            raise ServingError(f"model {model!r} has no version {version!r} (only "
                               f"{self.cfg.model_version})", 404, "version")
        return kind

    async def model_metadata(self, model: str, version: Optional[str] = None):
        kind = self._kind(model, version)
        inputs, outputs = io_spec(kind)
        return {"name": model, "versions": [self.cfg.model_version],
                "platform": "tensorrt_llm" if kind == TRTLLM_MODEL else "ensemble",
                "inputs": [{"name": n, "datatype": d, "shape": [-1] + dims}
                           for n, d, dims in inputs],
                "outputs": [{"name": n, "datatype": d, "shape": [-1] + dims}
                            for n, d, dims in outputs]}

    async def model_ready(self, model: str, version: Optional[str] = None):
        self._kind(model, version)
        return await self.ready()

    async def config(self, model: str, version: Optional[str] = None):
        kind = self._kind(model, version)
        return model_config(model, kind, self.client.info.max_batch_size,
                            self._parameters())

    def _parameters(self) -> dict:
        info = self.client.info
        return {"max_num_tokens": info.max_num_tokens, "max_model_len": info.max_model_len,
                "kv_cache_blocks": info.num_blocks, "tokens_per_block": info.block_size,
                **{k: v for k, v in self.cfg.model_config.items()}}

    async def stats(self, model: str, version: Optional[str] = None):
        self._kind(model, version)
        return {"model_stats": [{"name": model, "version": self.cfg.model_version}]}

    async def index(self):
        return [{"name": n, "version": self.cfg.model_version, "state": "READY"}
                for n in (self.cfg.served_model_name, ENSEMBLE_MODEL, TRTLLM_MODEL)]

    # ----- infer ----------------------------------------------------------------------------
    async def infer(self, request: Request, model: str, version: Optional[str] = None):
        try:
            kind = self._kind(model, version)
            body = await request.body()
            hlen = request.headers.get(HEADER_LEN)
            try:
                n = int(hlen) if hlen is not None else len(body)
                header = json.loads(body[:n])
            except (ValueError, UnicodeDecodeError) as e:
                raise bad_field("body", f"not a valid inference request header ({e})") from None
            binary = memoryview(body)[n:]
            if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
                raise bad_field("inputs", "is required (a list of tensors)")
            tensors, offset = {}, 0
            for inp in header["inputs"]:
                name, arr, offset = tensor_from_json(inp, binary, offset)
                tensors[name] = arr
            jobs = parse_jobs(self.client, tensors, kind, self.cfg.model_config)
            if any(j.stream for j in jobs):
                raise bad_field("streaming" if kind == TRTLLM_MODEL else "stream",
                                "streaming over HTTP infer is not possible; use gRPC "
                                "ModelStreamInfer or /generate_stream")
            for j in jobs:
                self.client.validate(j.prompt_ids, j.params)
            work = asyncio.gather(*(run_job(self.client, j) for j in jobs))
            results = await work
        except ServingError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        res = concat_batch([result_tensors(j, beams, self.client)
                            for j, beams in zip(jobs, results)])
        return self._infer_response(model, header, res)

    def _infer_response(self, model: str, header: dict, res: dict) -> Response:
        requested = header.get("outputs")
        default_binary = bool((header.get("parameters") or {}).get("binary_data_output"))
        if requested:
            names = {}
            for o in requested:
                name = o.get("name") if isinstance(o, dict) else None
                if name not in res:
                    raise ServingError(f"outputs: {name!r} is not an output of {model!r} "
                                       f"(has {', '.join(res)})", 400, "outputs")
                names[name] = bool((o.get("parameters") or {}).get("binary_data",
                                                                   default_binary))
        else:
            names = {k: default_binary for k in res}
        outs, blobs = [], []
        for name, binary in names.items():
            a = res[name]
            o = {"name": name, "datatype": np_datatype(a), "shape": list(a.shape)}
            if binary:
                blob = serialize_bytes(a) if a.dtype == np.object_ else \
                    np.ascontiguousarray(a).tobytes()
                o["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                flat = a.reshape(-1).tolist()
                o["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x
                             for x in flat]
            outs.append(o)
        body = {"model_name": model, "model_version": self.cfg.model_version, "outputs": outs}
        if "id" in header:
            body["id"] = header["id"]
        head = json.dumps(body).encode()
        if not blobs:
            return Response(head, media_type="application/json")
        return Response(head + b"".join(blobs), media_type="application/octet-stream",
                        headers={HEADER_LEN: str(len(head))})

    # ----- generate -------------------------------------------------------------------------
    async def _generate_jobs(self, request: Request, model: str, version: Optional[str]):
        kind = self._kind(model, version)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_field("body", f"not valid JSON ({e})") from None
        known = {n for n, _, _ in io_spec(kind)[0]}
        jobs = parse_jobs(self.client, generate_tensors(body, known), kind,
                          self.cfg.model_config)
        if len(jobs) != 1:
            raise bad_field("text_input", "generate takes one request")
        self.client.validate(jobs[0].prompt_ids, jobs[0].params)
        return jobs[0]

    async def generate(self, request: Request, model: str, version: Optional[str] = None):
        try:
            job = await self._generate_jobs(request, model, version)
            beams = await run_job(self.client, job)
        except ServingError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        return json_outputs(model, self.cfg.model_version,
                            result_tensors(job, beams, self.client))

    async def generate_stream(self, request: Request, model: str,
                              version: Optional[str] = None):
        try:
            job = await self._generate_jobs(request, model, version)
        except ServingError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        # bounded: when writing falls behind, new tokens gather in the request's inbox and go
        # out as one event of several tokens instead of a growing backlog of one-token events
        q: asyncio.Queue = asyncio.Queue(maxsize=2)
        mv = self.cfg.model_version

        async def on_chunk(job, index, inc, final):
            await q.put(json_outputs(model, mv, result_tensors(job, [inc], self.client,
                                                               partial=True)))

        async def work():
            try:
                await run_job(self.client, job, on_chunk)
            except ServingError as e:
                await q.put({"error": e.message})
            finally:
                # not when cancelled (the client went away): nobody empties the queue then
                if not asyncio.current_task().cancelling():
                    await q.put(None)

        async def events():
            task = asyncio.ensure_future(work())
            try:
                while True:
                    item = await q.get()
                    if item is None:
                        return
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
            finally:
                task.cancel()                  # a client gone away aborts the request
        return StreamingResponse(events(), media_type="text/event-stream")
