"""``irlm serve --model-repo DIR``: a Triton model repository set up for the TensorRT-LLM
backend, read so that its users keep their configuration.

Each ``DIR/<model>/config.pbtxt`` is parsed with protobuf's text format into Triton's own
``ModelConfig`` message (shipped with tritonclient), so a syntax error is reported as protobuf
reports it, with line and column.  The model whose backend is ``tensorrtllm`` carries the
engine settings in ``parameters``; each one maps onto an irlm setting (see the migration table
in docs/serving.md).  A parameter irlm does not know, a malformed value, or a ``${...}``
placeholder that was never filled in is an error naming the file and the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import IRLMError

POLICIES = {"guaranteed_no_evict": "guaranteed-no-evict", "max_utilization": "max-utilization"}

# parameters that map onto irlm settings (name -> kind)
MAPPED = {
    "engine_dir": "path", "gpt_model_path": "path",
    "batch_scheduler_policy": "policy",
    "kv_cache_free_gpu_mem_fraction": "fraction",
    "max_tokens_in_paged_kv_cache": "int",
    "enable_kv_cache_reuse": "bool",
    "enable_chunked_context": "bool",
    "max_num_tokens": "int",
    "max_beam_width": "int",
    "exclude_input_in_output": "bool",
    "max_queue_size": "int",
    "max_attention_window_size": "int",
    "batching_strategy": "strategy",
}
# parameters accepted and ignored: they tune TensorRT-LLM internals irlm does not have, or
# devices / features set elsewhere (see docs/serving.md)
IGNORED = {
    "gpt_model_type", "gpu_device_ids", "participant_ids", "kv_cache_host_memory_bytes",
    "kv_cache_onboard_blocks", "normalize_log_probs", "enable_trt_overlap", "gpu_weights_percent",
    "decoding_mode", "executor_worker_path", "cancellation_check_period_ms",
    "stats_check_period_ms", "iter_stats_max_iterations", "request_stats_max_iterations",
    "FORCE_CPU_ONLY_INPUT_TENSORS", "sink_token_length", "multi_block_mode",
    "enable_context_fmha_fp32_acc", "cross_kv_cache_fraction", "recv_timeout",
    "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size",
    "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes", "medusa_choices",
    "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size",
    "encoder_input_features_data_type", "tokenizer_dir", "add_special_tokens",
    "skip_special_tokens", "postprocessing_instance_count", "preprocessing_instance_count",
    "bls_instance_count", "accumulate_tokens", "logits_datatype", "triton_max_batch_size",
    "max_queue_delay_microseconds", "prompt_embedding_table_data_type",
    "kv_cache_retention_config", "speculative_decoding_fast_logits", "guided_decoding_backend",
    "xgrammar_tokenizer_info_path", "tensorrt_llm_model_name", "tensorrt_llm_draft_model_name",
    "multi_model", "use_draft_logits", "num_return_sequences",
}


@dataclass
class ModelRepo:
    name: str                         # the tensorrtllm model's name
    config_path: Path
    engine_dir: Optional[str]
    kv_cache_fraction: Optional[float] = None
    kv_tokens: Optional[int] = None   # max_tokens_in_paged_kv_cache
    max_queue: Optional[int] = None
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)   # exclude_input_in_output, ...
    models: list[str] = field(default_factory=list)        # every model of the repository


def parse_config(path: Path):
    """``config.pbtxt`` -> ``ModelConfig``; errors name the file, line and column."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise IRLMError(f"{path}: not UTF-8 text ({e})") from None
    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        detail = str(e).split(" : ", 1)[-1] if line else str(e)
        where = f"{path}:{line}:{col}" if line else str(path)
        raise IRLMError(f"{where}: {detail}") from None
    return msg


def load_model_repo(repo_dir) -> ModelRepo:
    root = Path(repo_dir)
    if not root.is_dir():
        raise IRLMError(f"--model-repo {root}: not a directory")
    configs = sorted(root.glob("*/config.pbtxt"))
    if not configs:
        raise IRLMError(f"--model-repo {root}: no <model>/config.pbtxt in it")
    parsed = [(p, parse_config(p)) for p in configs]
    trt = [(p, m) for p, m in parsed if m.backend == "tensorrtllm"
           or "engine_dir" in m.parameters or "gpt_model_path" in m.parameters]
    if len(trt) != 1:
        names = ", ".join(str(p) for p, _ in trt) or "none"
        raise IRLMError(f"--model-repo {root}: expected one model with backend "
                        f"\"tensorrtllm\", found {len(trt)} ({names})")
    path, msg = trt[0]
    repo = ModelRepo(name=msg.name or path.parent.name, config_path=path, engine_dir=None,
                     models=[m.name or p.parent.name for p, m in parsed])
    if msg.max_batch_size > 0:
        repo.llm_kwargs["max_batch_size"] = int(msg.max_batch_size)
    repo.config["decoupled"] = bool(msg.model_transaction_policy.decoupled)
    for key in msg.parameters:
        raw = msg.parameters[key].string_value
        where = f"{path}: parameters[\"{key}\"]"
        if "${" in raw:
            raise IRLMError(f"{where}: value {raw!r} is a template placeholder that was never "
                            f"filled in (tools/fill_template.py)")
        if key in IGNORED or raw.strip() == "":
            continue
        kind = MAPPED.get(key)
        if kind is None:
            raise IRLMError(f"{where}: unknown TensorRT-LLM backend parameter")
        value = _value(where, kind, raw.strip())
        if kind == "path":
            p = Path(value)
            repo.engine_dir = str(p if p.is_absolute() else (path.parent / p))
        elif key == "batch_scheduler_policy":
            repo.llm_kwargs["policy"] = value
        elif key == "kv_cache_free_gpu_mem_fraction":
            repo.kv_cache_fraction = value
        elif key == "max_tokens_in_paged_kv_cache":
            repo.kv_tokens = value
        elif key == "enable_kv_cache_reuse":
            repo.llm_kwargs["enable_prefix_caching"] = value
        elif key == "max_num_tokens":
            repo.llm_kwargs["max_num_tokens"] = value
        elif key == "max_queue_size":
            repo.max_queue = value
        elif key in ("exclude_input_in_output", "max_beam_width"):
            repo.config[key] = value
        # enable_chunked_context: irlm always chunks long prompts (docs/runtime.md);
        # max_attention_window_size: the engine's own (compiled) window applies.
    if repo.engine_dir is None:
        raise IRLMError(f"{path}: parameters has no \"engine_dir\" (or \"gpt_model_path\") "
                        f"naming the engine directory")
    return repo


def _value(where: str, kind: str, raw: str):
    try:
        if kind == "int":
            v = int(raw)
            if v < 1:
                raise ValueError
            return v
        if kind == "fraction":
            v = float(raw)
            if not 0 < v <= 1:
                raise ValueError
            return v
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if kind == "policy":
            return POLICIES[raw]
        if kind == "strategy":
            if raw not in ("inflight_fused_batching", "inflight_batching"):
                raise ValueError
            return raw
        return raw
    except (ValueError, KeyError):
        expected = {"int": "an integer >= 1", "fraction": "a number in (0, 1]",
                    "bool": "true or false", "policy": " or ".join(POLICIES),
                    "strategy": "inflight_fused_batching (irlm always batches in flight)",
                    "path": "a path"}[kind]
        raise IRLMError(f"{where}: {raw!r} is not {expected}") from None
