"""``irlm build IR_FILE --weights W.safetensors -o ENGINE``: an (edited) IR file → an engine.

Argument parsing only: :func:`irlm.compilation.build_engine` does the work (see
irlm/compilation/build.py for what it checks and which weights file holds which names).
"""
from __future__ import annotations

import sys

from . import SUMMARIES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build", help=SUMMARIES["build"],
        description="Build an engine from an IR file and the safetensors file(s) holding its "
                    "params: verify the IR, check every param against the weights, run the "
                    "passes it still needs (a stateless dump gets the -O level's), write the "
                    "engine.  Re-feed a dump of ENGINE with --weights ENGINE/weights.safetensors "
                    "--weights ENGINE/ir/weights.safetensors.")
    p.add_argument("ir_file", metavar="IR_FILE", help="the IR text file (e.g. an edited dump)")
    p.add_argument("--weights", metavar="FILE", action="append", default=[],
                   help="a safetensors file holding params of the IR (repeatable; required)")
    p.add_argument("-o", "--output", required=True, metavar="ENGINE",
                   help="the engine directory to write")
    p.add_argument("--from", dest="reference", metavar="ENGINE",
                   help="the engine whose build facts (EOS id, context length, tokenizer) to "
                        "reuse (default: the engine IR_FILE sits in, if any)")
    p.add_argument("--tokenizer", metavar="DIR|tokenizer.json",
                   help="the tokenizer to ship (default: the reference engine's)")
    p.add_argument("-O", dest="opt_level", metavar="LEVEL", default=None,
                   help="the -O level's passes to run first (a stateless dump: default -O2)")
    p.add_argument("--pipeline", metavar="PIPELINE", default=None,
                   help="more passes to run (after the level's)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="the engine's context length (default: the reference engine's, else "
                        "the IR's seq range)")
    p.add_argument("--tokens-per-block", type=int, default=16, metavar="N",
                   help="tokens per KV-cache block, when the IR is stateless (default 16)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty ENGINE that is not an earlier irlm output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compilation.build import WeightsMismatchError, build_engine
    try:
        result = build_engine(args.ir_file, args.weights, args.output,
                              tokenizer=args.tokenizer, reference=args.reference,
                              opt_level=args.opt_level, pipeline=args.pipeline,
                              max_model_len=args.max_model_len,
                              tokens_per_block=args.tokens_per_block, force=args.force)
    except WeightsMismatchError as e:
        for line in e.problems:          # one line per param
            print(f"irlm: error: {line}", file=sys.stderr)
        return 1
    print(result.summary())
    for note in result.notes:
        print(f"irlm: note: {note}", file=sys.stderr)
    return 0
