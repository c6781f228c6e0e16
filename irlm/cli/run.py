"""``irlm run ENGINE --prompt TEXT`` (or ``--chat``): generate with a compiled engine,
streaming tokens to the terminal."""
from __future__ import annotations

import asyncio
import sys

from ..errors import IRLMError


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text with a compiled engine",
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
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..runtime import LLM, SamplingParams
    if args.prompt is None and args.chat is None:
        raise IRLMError("give --prompt TEXT or --chat MESSAGE")
    if args.max_tokens < 1:
        raise IRLMError(f"--max-tokens {args.max_tokens}: must be at least 1")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    llm = LLM.from_engine(args.engine, device=args.device)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.chat}]
        prompt = llm.apply_chat_template(messages)
        prompt_ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    else:
        prompt_ids = args.prompt
    if args.no_stream:
        out = llm.generate([prompt_ids], params)[0]
        print(out.outputs[0].text)
        return 0

    async def stream():
        async for delta in llm.generate_stream(prompt_ids, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    asyncio.run(stream())
    return 0
