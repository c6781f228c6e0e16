"""Multi-rank engines run as one process per rank over torch.distributed (gloo on the CPU).

A tiny seeded Llama (4 heads / 2 kv heads, 2 layers) compiled unsplit and as tp 2, pp 2 and
tp 2 x pp 2 engines; the same layouts of a tiny OPT (biases on every projection, learned
positions, tied LM head) and a Qwen2 (QKV biases, one kv head) compiled by ``irlm compile``.  The oracles: the unsplit engine run by the reference interpreter (greedy
tokens through in-flight batching, first-step logits) and the threaded multi-rank simulator.
Faults: a worker killed mid-generation, a frozen worker and a worker whose shard is corrupt
stop the engine with one error naming the rank, and leave no process behind.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

from irlm.cli import main as irlm_main
from irlm.lowering.engine_format import EngineError, load_engine, write_parallel_engine
from irlm.passes.parallel import split_for_pipeline, split_for_tensor_parallel
from irlm.runtime import LLM, SamplingParams
from irlm.runtime.distributed import DistributedRunner, EngineStopped
from irlm.runtime.distributed.simulator import DistributedError
from irlm.runtime.distributed.comm import Layout
from irlm.runtime.runners.cpu import CpuGraphRunner
from irlm.runtime.runners.interpreter import GraphRunner, runner_for_engine
from irlm.runtime.model_runner import StepBatch
from irlm_test_helpers import alive

VOCAB = 96
PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 12], [8, 8, 40, 1]]
# different lengths: the second request leaves early, the third joins when a slot frees
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0) for n in (6, 3, 5)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(root / "hf")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0") \
        .save_pretrained(root / "hf")
    out = {}
    base = root / "base"
    assert irlm_main(["compile", "--hf", str(root / "hf"), "-o", str(base),
                      "--tokens-per-block", "4"]) == 0
    out["base"] = base
    # tp 2 x pp 2 through the CLI; tp 2 and pp 2 split from the unsplit plan (the same
    # split_stage does, without tracing the model again)
    out["tp2pp2"] = root / "tp2pp2"
    assert irlm_main(["compile", "--hf", str(root / "hf"), "-o", str(out["tp2pp2"]),
                      "--tokens-per-block", "4", "--tp", "2", "--pp", "2"]) == 0
    engine = load_engine(base)
    for name, ranks, tp, pp in (("tp2", split_for_tensor_parallel(engine.graph, 2), 2, 1),
                                ("pp2", split_for_pipeline(engine.graph, 2), 1, 2)):
        out[name] = write_parallel_engine(ranks, root / name, engine.config, tp=tp, pp=pp,
                                          tokenizer=engine.tokenizer)
    return out


def first_batch():
    return StepBatch.pack([0, 1], PROMPTS[:2], [0, 0], [[0, 1], [2]])


def generate(runner, tokenizer=None):
    llm = LLM(runner, tokenizer, max_batch_size=2)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def unsplit_oracles(path):
    """The unsplit engine's first-step logits and in-flight greedy tokens by the reference
    interpreter, and its first-step logits by the CPU executor (the workers' executor: f16
    linear weights, so the same rounding as theirs)."""
    engine = load_engine(path)
    logits = GraphRunner(engine.graph, num_blocks=16).step(first_batch())
    fast = CpuGraphRunner(engine.graph, num_blocks=16).step(first_batch())
    return logits, generate(GraphRunner(engine.graph, num_blocks=16)), fast


def check_logits(got, want, fast):
    """Equal to the CPU executor's unsplit logits up to the split's summation order, and to
    the reference's up to f16 weights."""
    scale = float(want.max() - want.min())
    assert (got - fast).abs().max().item() <= 1e-5 * scale
    assert (got - want).abs().max().item() <= 2e-3 * scale


@pytest.fixture(scope="module")
def unsplit(engines):
    return unsplit_oracles(engines["base"])




@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_pipeline_micro_batches_cut_the_rows_in_order(parts):
    from irlm.runtime.distributed.rank import split_rows
    prompts = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 12], [1], [8, 8]]
    batch = StepBatch.pack([10, 11, 12, 13], prompts, [0, 0, 4, 2],
                           [[0, 1], [2], [3, 4], [5]])
    got = split_rows(batch, parts)
    assert len(got) == min(parts, 4) and all(len(p) >= 1 for p in got)
    # each part is the batch that StepBatch.pack makes of its rows alone
    rows = [0] + list(torch.cumsum(torch.tensor([len(p) for p in got]), 0))
    for part, a, b in zip(got, rows, rows[1:]):
        want = StepBatch.pack(batch.request_ids[a:b], prompts[a:b],
                              batch.cached_lens[a:b].tolist(),
                              [[0, 1], [2], [3, 4], [5]][a:b])
        assert part.request_ids == want.request_ids
        for name in ("input_ids", "positions", "q_lens", "cached_lens"):
            assert torch.equal(getattr(part, name), getattr(want, name)), name
        w = want.block_tables.shape[1]
        assert torch.equal(part.block_tables[:, :w], want.block_tables)
        assert not part.block_tables[:, w:].any()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_processes_give_the_unsplit_tokens_and_logits(engines, unsplit, layout):
    want_logits, want_tokens, fast_logits = unsplit
    runner = DistributedRunner(engines[layout], device="cpu", num_blocks=16)
    try:
        procs = list(runner._procs.values())
        assert len(procs) == {"tp2": 1, "pp2": 1, "tp2pp2": 3}[layout]
        assert runner.vocab_size == VOCAB and runner.num_blocks == 16
        # every rank runs the CPU executor
        assert len(runner.rank_executors) == {"tp2": 2, "pp2": 2, "tp2pp2": 4}[layout]
        assert all(e.startswith("CpuGraphRunner, f16 linears") for e in runner.rank_executors)
        got = runner.step(first_batch())
        check_logits(got, want_logits, fast_logits)
        # the threaded simulator (tp x pp: one group per stage; the reference interpreter)
        sim = runner_for_engine(load_engine(engines[layout]), device="cpu", num_blocks=16,
                                parallel="simulator").step(first_batch())
        scale = float(want_logits.max() - want_logits.min())
        assert (sim - want_logits).abs().max().item() <= 1e-5 * scale
        tokens = generate(runner)
        assert tokens == want_tokens
        assert [len(t) for t in tokens] == [6, 3, 5]
    finally:
        runner.close()
    assert not any(alive(p.pid) for p in procs)


ARCHS = {
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
    # one kv head: tp 2 keeps a copy of it on each rank
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64),
}
LAYOUT_FLAGS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "tp2pp2": ["--tp", "2", "--pp", "2"]}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_engines(request, tmp_path_factory):
    """An architecture compiled by ``irlm compile`` unsplit and in each layout, and the
    unsplit engine's first-step logits and in-flight greedy tokens (reference interpreter)."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[request.param]()).eval()
    model.save_pretrained(root / "hf")
    out = {}
    for layout, flags in {"base": [], **LAYOUT_FLAGS}.items():
        out[layout] = root / layout
        assert irlm_main(["compile", "--hf", str(root / "hf"), "-o", str(out[layout]),
                          "--tokens-per-block", "4", *flags]) == 0
    return out, *unsplit_oracles(out["base"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUT_FLAGS))
def test_opt_and_qwen2_processes_give_the_unsplit_tokens(arch_engines, layout):
    paths, want_logits, want_tokens, fast_logits = arch_engines
    runner = DistributedRunner(paths[layout], device="cpu", num_blocks=16)
    try:
        procs = list(runner._procs.values())
        check_logits(runner.step(first_batch()), want_logits, fast_logits)
        assert generate(runner) == want_tokens
    finally:
        runner.close()
    assert not any(alive(p.pid) for p in procs)


@pytest.mark.slow
def test_reference_executor_ranks_give_the_reference_logits(engines, unsplit, monkeypatch):
    """IRLM_CPU_EXECUTOR=reference: every rank runs the interpreter, the oracle's arithmetic."""
    monkeypatch.setenv("IRLM_CPU_EXECUTOR", "reference")
    want_logits, want_tokens, _ = unsplit
    runner = DistributedRunner(engines["tp2pp2"], device="cpu", num_blocks=16)
    try:
        assert runner.rank_executors == ["GraphRunner"] * 4
        got = runner.step(first_batch())
        scale = float(want_logits.max() - want_logits.min())
        assert (got - want_logits).abs().max().item() <= 1e-5 * scale
        assert generate(runner) == want_tokens
    finally:
        runner.close()


@pytest.mark.slow
@pytest.mark.parametrize("threads", [None, 1])
def test_cpu_ranks_share_the_cores_out(engines, monkeypatch, threads):
    """Every rank's torch threads: its share of this host's cores by default (no
    oversubscription), or what ``threads`` says."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    want = threads or max(1, len(os.sched_getaffinity(0)) // 4)
    before = torch.get_num_threads()
    runner = DistributedRunner(engines["tp2pp2"], device="cpu", num_blocks=16, threads=threads)
    try:
        assert runner.rank_executors == [f"CpuGraphRunner, f16 linears, threads {want}"] * 4
        assert runner.describe().startswith("DistributedRunner, tp 2 x pp 2: CpuGraphRunner")
    finally:
        runner.close()
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_killed_worker_stops_the_engine_with_its_rank(engines):
    runner = DistributedRunner(engines["tp2"], device="cpu", num_blocks=16, timeout=20)
    worker = runner._procs[1]
    step = runner.step

    def step_then_kill(batch):
        if runner.num_steps == 3:          # mid-generation: the prefill and two decodes ran
            os.kill(worker.pid, signal.SIGKILL)
        return step(batch)
    runner.step = step_then_kill
    start = time.monotonic()
    with pytest.raises(EngineStopped, match=r"rank 1 \(pid \d+\) was killed by signal SIGKILL "
                                            r"during step 3"):
        generate(runner)
    assert time.monotonic() - start < 30
    assert not alive(worker.pid)
    with pytest.raises(EngineStopped, match="rank 1"):   # the engine stays stopped
        step(first_batch())


@pytest.mark.slow
def test_a_hung_worker_stops_the_engine_after_the_timeout(engines):
    runner = DistributedRunner(engines["pp2"], device="cpu", num_blocks=16, timeout=5)
    worker = runner._procs[1]
    step = runner.step

    def step_then_freeze(batch):
        if runner.num_steps == 2:
            os.kill(worker.pid, signal.SIGSTOP)     # alive, but runs nothing
        return step(batch)
    runner.step = step_then_freeze
    start = time.monotonic()
    try:
        with pytest.raises(EngineStopped, match=r"rank 1 (did not finish step 2 within the "
                                                r"timeout \(5 s\)|stopped responding during "
                                                r"step 2)"):
            generate(runner)
        assert time.monotonic() - start < 30
        assert not alive(worker.pid)
    finally:
        if alive(worker.pid):
            os.kill(worker.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_rank_that_cannot_load_its_shard_is_named(engines, tmp_path, monkeypatch):
    tag = monkeypatch_tag(monkeypatch)
    broken = tmp_path / "broken"
    shutil.copytree(engines["pp2"], broken)
    weights = broken / "rank1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])          # truncated
    start = time.monotonic()
    with pytest.raises(EngineStopped, match=r"rank 1 could not start: .*rank1/weights"
                                            r"\.safetensors: size .* \(truncated or replaced\)"):
        DistributedRunner(broken, device="cpu", num_blocks=16)
    assert time.monotonic() - start < 60
    assert not tagged(tag)                   # the worker that failed is gone


def test_a_rank_from_another_compile_is_refused_before_any_work(engines, tmp_path,
                                                                monkeypatch):
    tag = monkeypatch_tag(monkeypatch)
    mixed = tmp_path / "mixed"
    shutil.copytree(engines["tp2"], mixed)
    # rank 1 of the pp 2 engine: a valid engine, but not the one this manifest lists
    shutil.rmtree(mixed / "rank1")
    shutil.copytree(engines["pp2"] / "rank1", mixed / "rank1")
    with pytest.raises(EngineError, match=r"rank1/engine.json: (size|checksum)"):
        DistributedRunner(mixed, device="cpu")
    assert not tagged(tag)                   # no worker was started


def monkeypatch_tag(monkeypatch) -> str:
    """A tag in this process's environment that the workers it starts inherit (this
    process's own /proc/PID/environ is the one it was started with: it never matches)."""
    import uuid
    tag = uuid.uuid4().hex
    monkeypatch.setenv("IRLM_TEST_LAUNCH", tag)
    return tag


RUN = ["--prompt", "w5 w17 w33 w2", "--max-tokens", "5", "--no-stream", "--device", "cpu"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def unsplit_stdout(engines):
    """What ``irlm run`` prints for the unsplit engine (five greedy words)."""
    base = subprocess.run([sys.executable, "-m", "irlm", "run", str(engines["base"]), *RUN],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert base.returncode == 0, base.stderr
    assert len(base.stdout.split()) == 5
    return base.stdout


def launch_together(commands: list[list[str]], envs: list[dict], timeout: float = 240):
    """Run ``commands`` at once (each in its own session, with its env), wait for all of
    them within ``timeout``, and return their CompletedProcess-like (rc, stdout, stderr).  A
    hang fails the test after killing every process of those sessions.  Every process
    (and its descendants, which inherit the environment) carries a tag; afterwards none
    with the tag may be left."""
    import uuid
    tag = uuid.uuid4().hex
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, IRLM_TEST_LAUNCH=tag, OMP_NUM_THREADS="1"),
                              start_new_session=True) for cmd, env in zip(commands, envs)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in tagged(tag):
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the launch did not finish within {timeout:.0f} s")
    left = tagged(tag)
    for _ in range(20):                 # a moment for exiting processes to be gone
        if not left:
            break
        time.sleep(0.25)
        left = tagged(tag)
    assert not left, f"processes left behind: {left}"
    return results


def tagged(tag: str) -> list[int]:
    """Live processes whose environment has IRLM_TEST_LAUNCH=tag."""
    needle = f"IRLM_TEST_LAUNCH={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and alive(int(d)):
                    out.append(int(d))
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_torchrun_launch_runs_irlm_run_on_every_rank(engines, unsplit_stdout):
    port = free_port()
    [(rc, out, err)] = launch_together(
        [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
          "--master-port", str(port), "-m", "irlm", "run", str(engines["tp2"]), *RUN]],
        [dict(os.environ)])
    assert rc == 0, err[-3000:]
    # rank 0 prints the text once; rank 1 serves its shard and prints nothing
    assert out == unsplit_stdout


@pytest.mark.slow
def test_two_torchrun_nodes_give_the_unsplit_tokens(engines, unsplit_stdout):
    """Two torchrun launches (``--nnodes 2``, one process each) stand for two hosts: they
    meet at node 0's rendezvous store over TCP and run the tp 2 engine across the "hosts"
    (gloo over TCP between them)."""
    port = free_port()
    node = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--node-rank", str(r), "--master-addr", "127.0.0.1",
             "--master-port", str(port), "-m", "irlm", "run", str(engines["tp2"]), *RUN]
            for r in (0, 1)]
    (rc0, out0, err0), (rc1, out1, err1) = launch_together(node, [dict(os.environ)] * 2)
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
    assert out0 == unsplit_stdout and out1 == ""


@pytest.mark.slow
def test_env_rendezvous_without_torchrun(engines, unsplit_stdout):
    """Any launcher that sets the env:// variables (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; mpirun, SLURM scripts...) starts the ranks: rank 0 hosts the store.  Two
    plain ``python -m irlm run`` processes, each the only rank of its "host", run the pp 2
    engine (send/recv across them); rank 1 starts first and waits for rank 0."""
    port = free_port()
    envs = [dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0",
                 LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            for r in (1, 0)]
    cmd = [sys.executable, "-m", "irlm", "run", str(engines["pp2"]), *RUN]
    (rc1, out1, err1), (rc0, out0, err0) = launch_together([cmd, cmd], envs)
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
    assert out0 == unsplit_stdout and out1 == ""


def test_a_launch_of_the_wrong_size_is_refused(engines, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(DistributedError, match=r"the engine has 2 ranks \(tp 2 x pp 1\) but the "
                                        r"launch has WORLD_SIZE=3"):
        DistributedRunner(engines["tp2"], device="cpu")


@pytest.mark.parametrize("value", ["0", "two"])
def test_ranks_per_gpu_must_be_a_positive_whole_number(engines, monkeypatch, value):
    monkeypatch.setenv("IRLM_RANKS_PER_GPU", value)
    with pytest.raises(DistributedError, match=f"IRLM_RANKS_PER_GPU='{value}': expected a "
                                               f"whole number of at least 1"):
        DistributedRunner(engines["tp2"], device="cpu")
    monkeypatch.delenv("IRLM_RANKS_PER_GPU")
    monkeypatch.setenv("OMP_NUM_THREADS", value)       # the CPU ranks' threads
    with pytest.raises(DistributedError, match=f"OMP_NUM_THREADS='{value}': expected a "
                                               f"whole number of at least 1"):
        DistributedRunner(engines["tp2"], device="cpu")


def environ_of(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


@pytest.mark.slow
def test_a_killed_rank_of_a_two_node_launch_stops_both_nodes(engines):
    """Two torchrun "nodes", rank 1 killed once rank 0 has streamed its first token: rank 0
    has no exit code to read (not its child), only gloo's closed socket and rank 1's
    heartbeat that stopped; it names rank 1, both launches end within 30 s, no process
    of them is left."""
    import select
    import uuid
    tag = uuid.uuid4().hex
    port = free_port()
    run = ["--prompt", "w5 w17 w33 w2", "--max-tokens", "50", "--device", "cpu"]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "irlm", "run", str(engines["tp2"]), *run],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        env=dict(os.environ, IRLM_TEST_LAUNCH=tag, OMP_NUM_THREADS="1")) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        first = b""
        while not first.strip() and time.monotonic() < deadline:   # rank 0 streams tokens
            ready, _, _ = select.select([nodes[0].stdout], [], [], 1.0)
            if ready:
                chunk = os.read(nodes[0].stdout.fileno(), 4096)
                assert chunk, nodes[0].stderr.read().decode()[-3000:]
                first += chunk
        assert first.strip(), "rank 0 printed no token within 240 s"
        rank1 = [pid for pid in tagged(tag) if environ_of(pid).get("RANK") == "1"]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGKILL)
        killed = time.monotonic()
        results = [p.communicate(timeout=max(1.0, killed + 30 - time.monotonic()))
                   for p in nodes]
        assert time.monotonic() - killed < 30
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    err0 = results[0][1].decode()
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert re.search(r"irlm: error: multi-rank engine \S+ stopped: rank 1 stopped responding "
                     r"during step \d+ \(no heartbeat for \d+ s: its process died or froze\)",
                     err0), err0[-3000:]
    for _ in range(20):
        if not tagged(tag):
            break
        time.sleep(0.25)
    assert not tagged(tag)


JOINING_PROGRAM = r"""
import json, os, sys
import torch.distributed as dist
from irlm.runtime import LLM, SamplingParams
dist.init_process_group("gloo")        # the program's own group (env://), before the engine
llm = LLM(sys.argv[1], device="cpu")   # rank 1 serves its shard here, then exits
out = llm.generate([[5, 17, 33, 2]], SamplingParams(max_tokens=5, temperature=0.0))
llm.close()
assert dist.is_initialized()           # closing the engine left the program's group alone
print(json.dumps(out[0].outputs[0].token_ids), flush=True)
# as torch asks of a program that made a group: without this, gloo's threads met the
# interpreter's teardown now and then and the process aborted (SIGABRT) after its output
dist.destroy_process_group()
# ... and with it still, once in CI (2026-12-05): c10d's threads can still meet the teardown,
# which this test is not about; leave as irlm's own ranks do (docs/distributed.md)
sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_a_dropped_engine_does_not_block_the_next(engines, unsplit):
    """``del llm`` without close(): opening the next multi-rank engine in the process
    collects the dropped one (its watchdog holds it weakly), whose workers exit."""
    llm = LLM(str(engines["tp2"]), device="cpu", num_blocks=16)
    old = [p.pid for p in llm.engine.runner._procs.values()]
    del llm
    with LLM(str(engines["tp2"]), device="cpu", num_blocks=16) as again:
        got = [o.outputs[0].token_ids for o in again.generate(PROMPTS, PARAMS)]
    assert got == unsplit[1]
    for _ in range(40):
        if not any(alive(pid) for pid in old):
            break
        time.sleep(0.25)
    assert not any(alive(pid) for pid in old)


@pytest.mark.slow
def test_irlm_serve_runs_the_ranks_as_workers(engines):
    """``irlm serve`` of a tp 2 x pp 2 engine: concurrent OpenAI requests (in flight
    together) get the unsplit engine's greedy text; stopping the server leaves no process."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor
    from irlm.serving.testing import ServerProcess
    prompts = ["w5 w17 w33 w2 w9", "w70 w3", "w8 w8 w40 w1 w11 w12"]
    with LLM(str(engines["base"]), device="cpu") as llm:
        want = [o.outputs[0].text for o in llm.generate(
            prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))]
    import uuid
    tag = uuid.uuid4().hex
    with ServerProcess([str(engines["tp2pp2"]), "--device", "cpu"], grpc=False,
                       env={"IRLM_TEST_LAUNCH": tag}) as srv:
        assert len(tagged(tag)) >= 4            # the server, and its ranks 1..3 at least
        oai = openai.OpenAI(base_url=srv.openai_url, api_key="-", max_retries=0)

        def complete(prompt):
            r = oai.completions.create(model=oai.models.list().data[0].id, prompt=prompt,
                                       max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
            return r.choices[0].text
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(complete, prompts))
    assert srv.returncode == 0
    assert got == want
    for _ in range(40):
        if not tagged(tag):
            break
        time.sleep(0.25)
    assert not tagged(tag), "processes left behind"


@pytest.mark.slow
def test_a_program_that_made_its_own_process_group_opens_the_engine(engines):
    """env:// launch of a program that calls init_process_group itself (rank 0 hosts that
    store at MASTER_PORT), then opens the engine: the engine joins that group and store."""
    engine = load_engine(engines["base"])
    want = LLM(GraphRunner(engine.graph, num_blocks=16), None).generate(
        [[5, 17, 33, 2]], SamplingParams(max_tokens=5, temperature=0.0))[0].outputs[0].token_ids
    port = free_port()
    envs = [dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0",
                 LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            for r in (0, 1)]
    cmd = [sys.executable, "-c", JOINING_PROGRAM, str(engines["tp2"])]
    (rc0, out0, err0), (rc1, out1, err1) = launch_together([cmd, cmd], envs)
    assert rc0 == 0, f"rank 0 printed {out0!r}; its stderr ends: {err0[-3000:]}"
    assert rc1 == 0, err1[-3000:]
    assert json.loads(out0) == want and len(want) == 5 and out1 == ""


class _Store:
    def __init__(self, events):
        self.events = events

    def set(self, key, value):
        pass

    def wait(self, keys, timeout):
        self.events.append(f"wait for {', '.join(keys)}")


class _Spec:
    def key(self, *parts):
        return "/".join(map(str, parts))


def _closing_runner(fault, events):
    """A DistributedRunner as rank 0 holds it at close, without processes: its own worker's
    runner records when its CUDA graphs are released."""
    from irlm.runtime.distributed import runner as dr

    class Runner:
        def release_graphs(self):
            events.append("release graphs")

    class Worker:
        backend = "nccl"
        runner = Runner()
    r = DistributedRunner.__new__(DistributedRunner)
    r._closed, r._fault, r._owns_group, r.num_steps = False, fault, True, 3
    r._store, r.spec, r.worker, r._procs = _Store(events), _Spec(), Worker(), {}
    r.layout = Layout(2, 1, 0)
    dr._live.add(r)
    return r


@pytest.mark.parametrize("fault", [None, "rank 1 died"])
def test_rank_0_releases_its_cuda_graphs_before_it_leaves_the_group(monkeypatch, fault):
    """NCCL's teardown waits for the CUDA graphs that captured its calls (docs/distributed.md):
    a clean close destroys rank 0's graphs first; after a fault (graphs possibly stuck in a
    collective) it leaves at once.  A clean close of a joined launch (no processes of its own)
    first waits for the other rank to have read the stop (worker.py: ``left``)."""
    from irlm.runtime.distributed import runner as dr
    events = []
    monkeypatch.setattr(dr.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dr, "leave_process_group", lambda: events.append("leave group"))
    _closing_runner(fault, events).close()
    assert events == (["wait for left/1", "release graphs", "leave group"] if fault is None
                      else ["leave group"])
