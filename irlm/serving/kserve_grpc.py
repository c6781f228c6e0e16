"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService``, on the servicer class
that tritonclient ships (``service_pb2_grpc``), served by grpc.aio in the HTTP server's event
loop.  ``ModelStreamInfer`` is decoupled: a streaming request gets one response per new
token(s), the last one flagged ``triton_final_response``; cancelling the stream (tritonclient's
``stop_stream(cancel_requests=True)``) aborts its requests and frees their KV blocks at once.
"""
from __future__ import annotations

import asyncio
import hmac
import struct
from typing import Optional

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from .. import __version__
from .errors import ServingError, bad_field
from .kserve_tensors import (ENSEMBLE_MODEL, EXTENSIONS, NP_DTYPES, TRTLLM_MODEL, Job, concat_batch,
                             deserialize_bytes, io_spec, np_datatype, serialize_bytes,
                             model_kind, parse_jobs, result_tensors, run_job)

PUBLIC_METHODS = ("/inference.GRPCInferenceService/ServerLive",
                  "/inference.GRPCInferenceService/ServerReady")
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


#: responses a ModelStreamInfer call holds ready for gRPC to write (see there)
_STREAM_BACKLOG = 2


def decode_inputs(req) -> dict:
    tensors = {}
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise bad_field("raw_input_contents", "must have one entry per input")
    for i, inp in enumerate(req.inputs):
        dt, shape, name = inp.datatype, list(inp.shape), inp.name
        if dt not in NP_DTYPES:
            raise bad_field(f"inputs[{name}].datatype", f"unknown datatype {dt!r}")
        if raw:
            if dt == "BYTES":
                arr = np.array(deserialize_bytes(raw[i], name), dtype=np.object_)
            else:
                arr = np.frombuffer(raw[i], dtype=NP_DTYPES[dt])
        else:
            vals = list(getattr(inp.contents, _CONTENTS[dt]))
            arr = np.array(vals, dtype=NP_DTYPES[dt])
        count = int(np.prod(shape)) if shape else 1
        if arr.size != count:
            raise bad_field(f"inputs[{name}]", f"has {arr.size} elements, shape {shape} "
                                               f"needs {count}")
        tensors[name] = arr.reshape(shape)
    return tensors


def encode_response(model: str, version: str, rid: str, res: dict, requested: list[str],
                    final: Optional[bool] = None):
    resp = service_pb2.ModelInferResponse(model_name=model, model_version=version, id=rid)
    names = requested or list(res)
    for name in names:
        if name not in res:
            raise bad_field("outputs", f"{name!r} is not an output of {model!r}")
        a = res[name]
        t = resp.outputs.add()
        t.name, t.datatype = name, np_datatype(a)
        t.shape.extend(a.shape)
        resp.raw_output_contents.append(serialize_bytes(a) if a.dtype == np.object_
                                        else np.ascontiguousarray(a).tobytes())
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


def encode_ids_increment(model: str, version: str, rid: str, token_ids: list[int],
                         requested: list[str], final: bool):
    """``encode_response`` of a one-beam tensorrt_llm stream increment without log probs
    (output_ids ``[1, 1, k]``, sequence_length ``[1, 1]``), built without numpy: at hundreds
    of streams this runs once per token, and the arrays cost more than the message."""
    k = len(token_ids)
    raw = {"output_ids": ([1, 1, k], struct.pack(f"<{k}i", *token_ids)),
           "sequence_length": ([1, 1], struct.pack("<i", k))}
    resp = service_pb2.ModelInferResponse(model_name=model, model_version=version, id=rid)
    for name in requested or raw:
        if name not in raw:
            raise bad_field("outputs", f"{name!r} is not an output of {model!r}")
        shape, data = raw[name]
        t = resp.outputs.add()
        t.name, t.datatype = name, "INT32"
        t.shape.extend(shape)
        resp.raw_output_contents.append(data)
    resp.parameters["triton_final_response"].bool_param = final
    return resp


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, client, cfg):
        self.client, self.cfg = client, cfg

    def _kind(self, model: str, version: str) -> str:
        kind = model_kind(model, self.cfg.served_model_name)
        if version not in ("", self.cfg.model_version):
            raise ServingError(f"model {model!r} has no version {version!r}", 404, "version")
        return kind

    async def _abort(self, context, e: ServingError):
        await context.abort(e.grpc_code, e.message)

    def _ready(self) -> bool:
        c = self.client
        return c.info is not None and not c.draining and c.failure is None

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=self.client.failure is None)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context):
        try:
            self._kind(request.name, request.version)
        except ServingError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="irlm", version=__version__,
                                                  extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            kind = self._kind(request.name, request.version)
        except ServingError as e:
            await self._abort(context, e)
        inputs, outputs = io_spec(kind)
        T = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=request.name, versions=[self.cfg.model_version],
            platform="tensorrt_llm" if kind == TRTLLM_MODEL else "ensemble",
            inputs=[T(name=n, datatype=d, shape=[-1] + dims) for n, d, dims in inputs],
            outputs=[T(name=n, datatype=d, shape=[-1] + dims) for n, d, dims in outputs])

    async def ModelConfig(self, request, context):
        try:
            kind = self._kind(request.name, request.version)
        except ServingError as e:
            await self._abort(context, e)
        inputs, outputs = io_spec(kind)
        mc = model_config_pb2
        cfg = mc.ModelConfig(name=request.name,
                             backend="tensorrtllm" if kind == TRTLLM_MODEL else "ensemble",
                             max_batch_size=self.client.info.max_batch_size)
        for n, d, dims in inputs:
            cfg.input.add(name=n, data_type=mc.DataType.Value(
                "TYPE_" + ("STRING" if d == "BYTES" else d)), dims=dims, optional=True)
        for n, d, dims in outputs:
            cfg.output.add(name=n, data_type=mc.DataType.Value(
                "TYPE_" + ("STRING" if d == "BYTES" else d)), dims=dims)
        cfg.model_transaction_policy.decoupled = True
        info = self.client.info
        params = {"max_num_tokens": info.max_num_tokens, "max_model_len": info.max_model_len,
                  "kv_cache_blocks": info.num_blocks, "tokens_per_block": info.block_size,
                  **self.cfg.model_config}
        for k, v in params.items():
            cfg.parameters[k].string_value = str(v)
        return service_pb2.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request, context):
        return service_pb2.ModelStatisticsResponse()

    async def RepositoryIndex(self, request, context):
        M = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[
            M(name=n, version=self.cfg.model_version, state="READY")
            for n in (self.cfg.served_model_name, ENSEMBLE_MODEL, TRTLLM_MODEL)])

    # ----- inference ------------------------------------------------------------------------
    def _jobs(self, request) -> tuple[str, list[Job]]:
        kind = self._kind(request.model_name, request.model_version)
        jobs = parse_jobs(self.client, decode_inputs(request), kind, self.cfg.model_config)
        for j in jobs:
            self.client.validate(j.prompt_ids, j.params)
        return kind, jobs

    async def ModelInfer(self, request, context):
        try:
            _, jobs = self._jobs(request)
            results = await asyncio.gather(*(run_job(self.client, j) for j in jobs))
            res = concat_batch([result_tensors(j, b, self.client)
                                for j, b in zip(jobs, results)])
            return encode_response(request.model_name, self.cfg.model_version, request.id,
                                   res, [o.name for o in request.outputs])
        except ServingError as e:
            await self._abort(context, e)

    async def ModelStreamInfer(self, request_iterator, context):
        # Bounded: when gRPC writes fall behind the engine, a request's producer waits here
        # and its new tokens gather in its stream's inbox, to go out as one response of
        # several tokens, instead of a backlog of one-token responses that never catches up.
        out: asyncio.Queue = asyncio.Queue(maxsize=_STREAM_BACKLOG)
        tasks: set[asyncio.Task] = set()

        async def one(request):
            mv = self.cfg.model_version
            try:
                _, jobs = self._jobs(request)
                empty_final = request.parameters["triton_enable_empty_final_response"] \
                    .bool_param if "triton_enable_empty_final_response" in request.parameters \
                    else False
                wanted = [o.name for o in request.outputs]
                if len(jobs) == 1 and jobs[0].stream:
                    job = jobs[0]
                    ids_only = job.kind == TRTLLM_MODEL and job.params.n == 1 and \
                        not job.return_log_probs

                    async def on_chunk(job, index, inc, finished):
                        final = finished and not empty_final
                        if ids_only:
                            resp = encode_ids_increment(request.model_name, mv, request.id,
                                                        inc.token_ids, wanted, final)
                        else:
                            res = result_tensors(job, [inc], self.client, partial=True)
                            resp = encode_response(request.model_name, mv, request.id, res,
                                                   wanted, final=final)
                        await out.put(service_pb2.ModelStreamInferResponse(
                            infer_response=resp))
                    await run_job(self.client, jobs[0], on_chunk)
                    if empty_final:
                        final = service_pb2.ModelInferResponse(
                            model_name=request.model_name, model_version=mv, id=request.id)
                        final.parameters["triton_final_response"].bool_param = True
                        await out.put(service_pb2.ModelStreamInferResponse(
                            infer_response=final))
                else:
                    results = await asyncio.gather(*(run_job(self.client, j) for j in jobs))
                    res = concat_batch([result_tensors(j, b, self.client)
                                        for j, b in zip(jobs, results)])
                    await out.put(service_pb2.ModelStreamInferResponse(
                        infer_response=encode_response(request.model_name, mv, request.id,
                                                       res, wanted, final=True)))
            except ServingError as e:
                await out.put(service_pb2.ModelStreamInferResponse(error_message=e.message))

        async def reader():
            async for request in request_iterator:
                t = asyncio.ensure_future(one(request))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        read = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                yield item
        finally:                      # the client cancelled or went away: abort everything
            read.cancel()
            for t in list(tasks):
                t.cancel()


class _Auth(grpc.aio.ServerInterceptor):
    def __init__(self, key: str):
        self.key = key.encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key (metadata authorization: Bearer KEY)")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(
            lambda it, context: deny(None, context))

    async def intercept_service(self, continuation, details):
        if details.method in PUBLIC_METHODS:
            return await continuation(details)
        md = dict(details.invocation_metadata or ())
        value = md.get("authorization", "")
        token = value[7:].strip() if value.lower().startswith("bearer ") else value.strip()
        if hmac.compare_digest(token.encode(), self.key):
            return await continuation(details)
        if details.method.endswith("/ModelStreamInfer"):
            return self._deny_stream
        return self._deny


async def start_grpc(client, cfg):
    interceptors = [_Auth(cfg.api_key)] if cfg.api_key else []
    # max_concurrent_streams, explicitly unbounded: one client channel multiplexes all its
    # calls over one HTTP/2 connection, and hundreds of concurrent ModelStreamInfer calls
    # must not wait on a per-connection limit (admission is --max-queue's job)
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_concurrent_streams", 2**31 - 1)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(client, cfg), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    if port == 0:
        raise ServingError(f"could not listen on {cfg.host}:{cfg.grpc_port} (gRPC)", 500)
    await server.start()
    return server
