"""`irlm serve --model-repo DIR`: a Triton model repository's config.pbtxt (TensorRT-LLM
backend parameters) read with protobuf text format into Triton's ModelConfig message."""
from __future__ import annotations

import pytest

pytest.importorskip("tritonclient.grpc")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.errors import IRLMError  # noqa: E402
from irlm.serving.model_repo import load_model_repo  # noqa: E402

TRTLLM = """
name: "tensorrt_llm"
backend: "tensorrtllm"
max_batch_size: 32
model_transaction_policy { decoupled: true }
input [ { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] allow_ragged_batch: true } ]
output [ { name: "output_ids" data_type: TYPE_INT32 dims: [ -1, -1 ] } ]
parameters: { key: "gpt_model_path" value: { string_value: "../engines/llama" } }
parameters: { key: "batch_scheduler_policy" value: { string_value: "max_utilization" } }
parameters: { key: "kv_cache_free_gpu_mem_fraction" value: { string_value: "0.85" } }
parameters: { key: "max_tokens_in_paged_kv_cache" value: { string_value: "4096" } }
parameters: { key: "enable_kv_cache_reuse" value: { string_value: "false" } }
parameters: { key: "enable_chunked_context" value: { string_value: "true" } }
parameters: { key: "max_num_tokens" value: { string_value: "2048" } }
parameters: { key: "exclude_input_in_output" value: { string_value: "true" } }
parameters: { key: "normalize_log_probs" value: { string_value: "false" } }
parameters: { key: "max_beam_width" value: { string_value: "" } }
"""
ENSEMBLE = 'name: "ensemble"\nplatform: "ensemble"\nmax_batch_size: 32\n'


def make_repo(tmp_path, trtllm=TRTLLM):
    for name, text in (("tensorrt_llm", trtllm), ("ensemble", ENSEMBLE)):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "config.pbtxt").write_text(text)
    return tmp_path


def test_tensorrt_llm_parameters_map_onto_irlm_settings(tmp_path):
    repo = load_model_repo(make_repo(tmp_path))
    assert repo.name == "tensorrt_llm" and sorted(repo.models) == ["ensemble", "tensorrt_llm"]
    assert repo.engine_dir == str(tmp_path / "tensorrt_llm" / "../engines/llama")
    assert repo.llm_kwargs == {"max_batch_size": 32, "policy": "max-utilization",
                               "enable_prefix_caching": False, "max_num_tokens": 2048}
    assert repo.kv_cache_fraction == 0.85 and repo.kv_tokens == 4096
    assert repo.config == {"decoupled": True, "exclude_input_in_output": True}


@pytest.mark.parametrize("edit, message", [
    (('"normalize_log_probs"', '"normalise_log_probs"'),
     'parameters["normalise_log_probs"]: unknown TensorRT-LLM backend parameter'),
    (('"0.85"', '"1.5"'),
     'parameters["kv_cache_free_gpu_mem_fraction"]: \'1.5\' is not a number in (0, 1]'),
    (('"max_utilization"', '"${batch_scheduler_policy}"'),
     'parameters["batch_scheduler_policy"]: value \'${batch_scheduler_policy}\' is a template '
     'placeholder'),
    (('"4096"', '"lots"'),
     'parameters["max_tokens_in_paged_kv_cache"]: \'lots\' is not an integer >= 1'),
    (("max_batch_size: 32", "max_batch_size: thirty"),
     ":4:17: 'max_batch_size: thirty': Couldn't parse integer"),
])
def test_bad_parameters_name_the_file_and_the_field(tmp_path, edit, message):
    make_repo(tmp_path, TRTLLM.replace(*edit))
    with pytest.raises(IRLMError) as e:
        load_model_repo(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "tensorrt_llm" / "config.pbtxt"))
    assert message in str(e.value)


def test_cli_reports_a_bad_repository_in_one_line(tmp_path, capsys):
    make_repo(tmp_path, TRTLLM.replace('"true" } }\nparameters: { key: "max_num_tokens"',
                                       '"maybe" } }\nparameters: { key: "max_num_tokens"'))
    assert irlm_main(["serve", "--model-repo", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"irlm: error: {tmp_path / 'tensorrt_llm' / 'config.pbtxt'}: "
                   f"parameters[\"enable_chunked_context\"]: 'maybe' is not true or false")
    assert irlm_main(["serve", "--model-repo", str(tmp_path / "nowhere")]) == 1
    assert "not a directory" in capsys.readouterr().err
