"""Issue 15's one-GPU NCCL check run by hand, with what a hang needs to be understood: every
line the rank-0 process and its worker write, stamped with seconds since start, NCCL's INIT/NET
log, and every Python thread's stack in both processes after FH_AFTER seconds (faulthandler,
switched on through a sitecustomize on PYTHONPATH).  Runs what
tests/test_distributed_gpu.py's sharing test runs, outside pytest, so nothing is swallowed.

    python3 scripts/device-nccl-share.py OUTDIR [TIMEOUT_S] [FH_AFTER_S]
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

out = Path(sys.argv[1])
timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 200
fh_after = int(sys.argv[3]) if len(sys.argv) > 3 else 150
root = Path(os.environ.get("TMPDIR", "/tmp")) / "nccl-share"
root.mkdir(parents=True, exist_ok=True)
t0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - t0:7.2f}s] {msg}", flush=True)


import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_distributed_gpu import PROMPTS, SHARED_GPU_RANK0  # noqa: E402

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.lowering.engine_format import load_engine, write_parallel_engine  # noqa: E402
from irlm.passes.parallel import split_for_tensor_parallel  # noqa: E402

torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=256)
transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(root / "hf")
assert irlm_main(["compile", "--hf", str(root / "hf"), "-o", str(root / "base")]) == 0
engine = load_engine(root / "base")
tp2 = write_parallel_engine(split_for_tensor_parallel(engine.graph, 2), root / "tp2",
                            engine.config, tp=2, pp=1)
log("engines written")

fh = root / "fh"
fh.mkdir(exist_ok=True)
(fh / "sitecustomize.py").write_text(
    "import faulthandler, signal, sys\n"
    f"faulthandler.dump_traceback_later({fh_after}, exit=False, file=sys.stderr)\n"
    "faulthandler.register(signal.SIGUSR1, all_threads=True, file=sys.stderr)\n")
env = dict(os.environ, NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET,ENV",
           PYTHONPATH=os.pathsep.join(filter(None, [str(fh), os.environ.get("PYTHONPATH")])),
           CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
proc = subprocess.Popen([sys.executable, "-c", SHARED_GPU_RANK0, str(tp2), json.dumps(PROMPTS),
                         str(out / "share-out.json")], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def pump():
    for line in proc.stdout:
        log(line.rstrip())


reader = threading.Thread(target=pump, daemon=True)
reader.start()
try:
    rc = proc.wait(timeout=timeout)
    log(f"rank 0 exited with {rc}")
except subprocess.TimeoutExpired:
    log(f"still running after {timeout:.0f} s: stacks (SIGUSR1), then kill")
    os.killpg(proc.pid, 10)
    time.sleep(3)
    os.killpg(proc.pid, 9)
    rc = None
reader.join(timeout=5)
if rc == 0:
    got = json.loads((out / "share-out.json").read_text())
    log(f"tokens {got['tokens']} replays {got['replays']} device {got['device']}")
sys.exit(0 if rc == 0 else 1)
