"""``irlm run ENGINE --prompt TEXT`` (or ``--chat``): generate with a compiled engine,
streaming tokens to the terminal."""
from __future__ import annotations

import asyncio
import os
import sys
import time

from . import SUMMARIES
from ..errors import IRLMError


def add_parser(sub) -> None:
    p = sub.add_parser("run", help=SUMMARIES["run"],
                       description="Generate with an engine directory written by irlm compile.")
    p.add_argument("engine", metavar="ENGINE", help="engine directory (irlm compile -o ENGINE)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text (sent as is, no chat template)")
    src.add_argument("--chat", metavar="MESSAGE",
                     help="a user message, formatted with the model's chat template")
    p.add_argument("--system", help="a system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the CPU executor (default: the physical cores; each "
                        "rank of a multi-rank engine: its share of them)")
    p.add_argument("--executor", choices=("fast", "reference"), default=None,
                   help="CPU executor: fast (default; ops bound once to torch's CPU kernels) "
                        "or reference (the interpreter; slow, for debugging)")
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    p.add_argument("--quiet", action="store_true",
                   help="do not print the timing line (TTFT, decode tok/s) on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..runtime import LLM
    from ..runtime.distributed.runner import is_multi_rank
    if args.prompt is None and args.chat is None:
        raise IRLMError("give --prompt TEXT or --chat MESSAGE")
    if args.max_tokens < 1:
        raise IRLMError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise IRLMError(f"--threads {args.threads}: must be at least 1")
    if args.system is not None and args.chat is None:
        raise IRLMError("--system: only with --chat (a --prompt is sent as it is, without the "
                        "chat template)")
    # The tokenizer's own thread pool would compete with the GEMMs' threads for the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = _sampling_params(args)
    threads = args.threads
    if threads is None and args.device != "cuda" and not is_multi_rank(args.engine):
        # (a multi-rank engine shares this host's cores out among its ranks itself)
        from ..runtime.runners.cpu import physical_cores
        threads = physical_cores()
    llm = LLM(args.engine, device=args.device, executor=args.executor, threads=threads)
    try:
        return _generate(llm, args, params)
    finally:
        llm.close()       # a multi-rank engine's worker processes


def _sampling_params(args):
    """The flags as SamplingParams; a bad value names its flag."""
    import re
    from ..runtime import SamplingParams
    from ..runtime.sampling import SamplingParamsError
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except SamplingParamsError as e:
        m = re.match(r"SamplingParams\.(\w+) (.*)", str(e))
        if m is None:
            raise IRLMError(str(e)) from None
        flag = "--" + m.group(1).replace("_", "-")
        raise IRLMError(f"{flag} {getattr(args, m.group(1), '')}: {m.group(2)}") from None


def _generate(llm, args, params) -> int:
    if llm.tokenizer is None:
        raise IRLMError(f"{args.engine}: the engine has no tokenizer, so it cannot take text "
                        f"(an `irlm build` without --from or --tokenizer); rebuild it with "
                        f"--from COMPILED_ENGINE or --tokenizer DIR, or call LLM.generate with "
                        f"token ids from Python")
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.chat}]
        prompt = llm.apply_chat_template(messages)
        prompt_ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    else:
        prompt_ids = llm.tokenizer.encode(args.prompt) if llm.tokenizer is not None \
            else args.prompt
    context = llm.engine.runner.max_model_len
    if len(prompt_ids) + args.max_tokens > context:
        room = context - len(prompt_ids)
        raise IRLMError(f"--max-tokens {args.max_tokens}: the engine's context is {context} "
                        f"tokens (max_model_len) and the prompt takes {len(prompt_ids)}, so at "
                        f"most {max(room, 0)} can be generated"
                        + ("; give a shorter prompt" if room < 1 else
                           f"; give --max-tokens {room} or less, or compile with a larger "
                           f"--max-seq"))
    timing = {"first": None, "tokens": 0}
    pieces: list[str] = []

    async def stream():
        start = time.perf_counter()
        async for delta in llm.generate_stream(prompt_ids, params):
            if delta.token_ids and timing["first"] is None:
                timing["first"] = time.perf_counter()
            timing["tokens"] += len(delta.token_ids)
            if args.no_stream:
                pieces.append(delta.text)
            else:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        timing["start"], timing["end"] = start, time.perf_counter()
    asyncio.run(stream())
    sys.stdout.write("".join(pieces) + "\n")
    sys.stdout.flush()
    if not args.quiet:
        print(timing_line(llm, len(prompt_ids), timing), file=sys.stderr)
    return 0


def timing_line(llm, prompt_tokens: int, timing: dict) -> str:
    """``prompt N tokens, TTFT x s (prefill y tok/s); M tokens, decode z tok/s (executor)``."""
    first, n = timing["first"], timing["tokens"]
    ttft = (first or timing["end"]) - timing["start"]
    line = f"prompt {prompt_tokens} tokens, TTFT {ttft:.3f} s ({prompt_tokens / ttft:.1f} " \
           f"tok/s prefill)"
    if n > 1:
        decode = timing["end"] - first
        line += f"; {n} tokens, decode {(n - 1) / decode:.1f} tok/s"
    from ..runtime.model_runner import describe_executor
    return f"{line} [{describe_executor(llm.engine.runner)}]"
