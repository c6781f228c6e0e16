"""Fuzzing the IR parser: thousands of token-level mutations of valid IR texts.

Whatever the mutation, parsing must either succeed (and then the graph must print, and the
printout must parse back to the same text) or raise exactly ParseError with a message of the
form ``NAME:LINE:COL: error: ...`` pointing inside the text.  Never any other exception: no
KeyError, RecursionError, sympy or torch errors, lark internals.  Seeded and deterministic.
"""
from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest

from irlm.errors import ParseError
from irlm.text.parser import parse_graph
from irlm.text.printer import print_graph

ROOT = Path(__file__).resolve().parents[1]

SMALL = """\
# a decoder fragment with every construct of the format
dim batch = [1, 64]
dim seq = [1, 4096]

graph @decoder(%ids: tensor<[batch]x[seq]xi64>, %mask: tensor<[batch]x[seq]xbool>) -> (tensor<[batch]x[seq]x576xf32>, tensor<[batch]x[seq]x288xf32>) {
  %w0 = param "model.embed_tokens.weight" : tensor<49152x576xf32>
  %h0 = core.embedding(%w0, %ids) : tensor<[batch]x[seq]x576xf32> loc("model.embed_tokens" "modeling_llama.py":71)
  %r = core.reshape(%h0) {shape = [batch*seq, 576]} : tensor<[batch*seq]x576xf32>
  %a, %b = core.split(%h0) {dim = 2, sizes = [288, 288]} : tensor<[batch]x[seq]x288xf32>, tensor<[batch]x[seq]x288xf32>
  %c = core.constant {value = dense<tensor<2xf32>, [1.0, 2.5]>} : tensor<2xf32>
  %f = core.full {dtype = bf16, shape = [batch, 1], value = -inf} : tensor<[batch]x1xbf16>
  %s = core.slice(%h0) {dim = 1, end = seq - 1, start = (seq + 1) // 2} : tensor<[batch]x[seq - (seq + 1) // 2 - 1]x576xf32>
  return %h0, %a
}
"""

KINDS = """\
dim n = [1, 8]

graph @"kinds \\"graph\\""(%x: tensor<[n]x4xf32>, %i: tensor<3xi64>) -> (tensor<[n]x4xf32>) {
  %k = core.constant {value = dense<tensor<2x2xbool>, [[true, false], [false, true]]>} : tensor<2x2xbool>
  %j = core.constant {value = dense<tensor<3xi64>, [-1, 0, 4611686018427387904]>} : tensor<3xi64>
  %z = core.constant {value = dense<tensor<bf16>, 0.10009765625>} : tensor<bf16>
  %g = core.gelu(%x) {approximate = "tanh"} : tensor<[n]x4xf32> loc("m\\"q\\"\\n" "f.py":3)
  %m, %mi = core.max(%g) {dim = -1, keepdim = true} : tensor<[n]x1xf32>, tensor<[n]x1xi64>
  %e = core.expand(%m) {shape = [n, 4]} : tensor<[n]x4xf32> loc("" "x.py":9)
  %c = core.clamp(%e) {max = 6.0, min = nan} : tensor<[n]x4xf32>
  %l = core.layer_norm(%c) {eps = 1e-05, normalized_shape = [4]} : tensor<[n]x4xf32>
  %p = core.permute(%l) {dims = [1, 0]} : tensor<4x[n]xf32>
  %t = core.transpose(%p) {dim0 = 0, dim1 = -1} : tensor<[n]x4xf32>
  %ar = core.arange {dtype = i32, end = max(n, 2)} : tensor<[max(2, n)]xi32>
  return %t
}
"""

# Characters a mutation may insert: punctuation of the format, quotes, escapes, odd unicode.
ODD_CHARS = list("{}[]()<>%@#\"\\:,=-+*/x.0123456789") + ["\n", "\t", "\x00", "é", "\u2028",
                                                           "\ufeff", "tensor<", "loc(", "dense<"]

TOKEN_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|%[A-Za-z0-9_.$-]+|@[A-Za-z0-9_.$-]+|'
                      r"[A-Za-z_][A-Za-z0-9_.]*|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|//|->|\S")


def _decoder_text() -> str:
    """A ~100-op text printed by the printer: one layer of the benchmark's Llama decoder."""
    spec = importlib.util.spec_from_file_location("ir_text_bench", ROOT / "benchmarks" /
                                                  "ir_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return print_graph(mod.build_decoder(layers=1))


def _mutate(text: str, rng: random.Random) -> str:
    """1 to 3 random token-level edits: delete, duplicate, swap, replace with another token of
    the text, insert an odd character, or truncate."""
    matches = list(TOKEN_RE.finditer(text))
    toks = [m.group() for m in matches]
    seps = [text[(matches[i - 1].end() if i else 0):m.start()] for i, m in enumerate(matches)]
    tail = text[matches[-1].end():]
    for _ in range(rng.randint(1, 3)):
        if not toks:
            break
        i = rng.randrange(len(toks))
        kind = rng.choice(["delete", "duplicate", "swap", "replace", "replace", "insert",
                           "truncate"])
        if kind == "delete":
            del toks[i], seps[i]
        elif kind == "duplicate":
            toks.insert(i, toks[i])
            seps.insert(i, rng.choice(["", " "]))
        elif kind == "swap":
            j = rng.randrange(len(toks))
            toks[i], toks[j] = toks[j], toks[i]
        elif kind == "replace":
            toks[i] = rng.choice(toks)
        elif kind == "insert":
            toks.insert(i, rng.choice(ODD_CHARS))
            seps.insert(i, "")
        else:
            del toks[i:], seps[i:]
            tail = ""
    return "".join(s + t for s, t in zip(seps, toks)) + tail


def _fuzz(name: str, text: str, count: int, seed: int) -> dict:
    rng = random.Random(seed)
    stats = {"parsed": 0, "rejected": 0}
    message = re.compile(rf"^{re.escape(name)}:(\d+):(\d+): error: \S")
    for k in range(count):
        mutant = _mutate(text, rng)
        try:
            g = parse_graph(mutant, name)
        except ParseError as e:
            m = message.match(str(e))
            assert m, f"mutant {k}: badly formed message {str(e)!r}\n--- text ---\n{mutant}"
            line, col = int(m.group(1)), int(m.group(2))
            lines = mutant.split("\n")
            assert 1 <= line <= len(lines) and 1 <= col <= len(lines[line - 1]) + 1, \
                f"mutant {k}: position {line}:{col} is outside the text: {e}\n{mutant}"
            stats["rejected"] += 1
            continue
        except Exception as e:  # the bug this test exists to find
            pytest.fail(f"mutant {k}: {type(e).__name__} escaped the parser: {e}\n"
                        f"--- text ---\n{mutant}")
        printed = print_graph(g)
        assert print_graph(parse_graph(printed, name)) == printed, f"mutant {k}:\n{mutant}"
        stats["parsed"] += 1
    return stats


@pytest.mark.parametrize("name,count,seed", [("small.irlm", 1400, 1), ("kinds.irlm", 1400, 2),
                                             ("decoder.irlm", 900, 3)])
def test_mutated_texts_parse_or_raise_parse_error(name, count, seed):
    text = {"small.irlm": SMALL, "kinds.irlm": KINDS}.get(name) or _decoder_text()
    print_graph(parse_graph(text, name))  # the seed text itself is valid
    stats = _fuzz(name, text, count, seed)
    # the mutations must exercise both outcomes, or the test proves little
    assert stats["rejected"] > count // 2 and stats["parsed"] > 0, stats
