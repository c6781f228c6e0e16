"""Cost of hostile IR inputs as they grow: time and peak memory must grow linearly.

    python benchmarks/hostile_input_scaling.py [--scale 1]

Each family is measured at sizes n, 2n, 4n (one forked child per point, so peak RSS is the
point's own): a value with n uses (parse + verify), an n-character string in an attribute
dictionary (parse), n-deep JSON in an engine manifest (read).  Prints seconds and MiB per point
and the ratio between the 4n and n points (linear: about 4; quadratic: about 16).
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fan_out(n: int) -> None:
    from irlm.text.parser import parse_graph
    from irlm.verifier import verify
    lines = ["graph @f(%x: tensor<4xf32>) -> (tensor<4xf32>) {"]
    lines += [f"  %y{i} = core.neg(%x) : tensor<4xf32>" for i in range(n)]
    lines += [f"  return %y{n - 1}", "}"]
    verify(parse_graph("\n".join(lines), "fanout.irlm"))


def long_string(n: int) -> None:
    from irlm.text.parser import parse_graph
    text = ("graph @f(%x: tensor<4xf32>) -> (tensor<4xf32>) {\n"
            f'  %y = core.neg(%x) {{note = "{"w" * n}"}} : tensor<4xf32>\n  return %y\n}}\n')
    try:
        parse_graph(text, "long.irlm")
    except Exception:
        pass


def deep_json(n: int) -> None:
    from irlm.input_limits import parse_json_bounded
    try:
        parse_json_bounded(b"[" * n + b"]" * n, "engine.json", max_depth=32)
    except Exception:
        pass


FAMILIES = {"fan-out (uses)": (fan_out, 10_000), "string (chars)": (long_string, 2_500_000),
            "JSON depth": (deep_json, 1_000_000)}


def _child(fn, n, conn):
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn(n)
    conn.send((time.perf_counter() - t0,
               (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))


def measure(fn, n):
    ctx = multiprocessing.get_context("fork")
    parent, conn = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(fn, n, conn))
    p.start()
    result = parent.recv()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every base size")
    args = ap.parse_args()
    import irlm.text.parser  # noqa: F401  (warm imports and the grammar before forking)
    import irlm.verifier  # noqa: F401
    print(f"{'family':<16} {'n':>10} {'seconds':>8} {'MiB':>8}")
    for name, (fn, base) in FAMILIES.items():
        points = []
        for k in (1, 2, 4):
            n = int(base * args.scale * k)
            s, mib = measure(fn, n)
            points.append((s, mib))
            print(f"{name:<16} {n:>10} {s:>8.3f} {mib:>8.1f}")
        ratio = points[2][0] / max(points[0][0], 1e-9)
        print(f"{name:<16} {'4n/n time':>10} {ratio:>8.1f}")


if __name__ == "__main__":
    main()
