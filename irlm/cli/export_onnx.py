"""``irlm export-onnx IR_FILE -o OUT``: an IR file (or engine directory) -> OUT/model.onnx.

A thin wrapper over irlm.lowering.onnx (docs/onnx.md).
"""
from __future__ import annotations

from . import SUMMARIES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-onnx", help=SUMMARIES["export-onnx"],
        description="Lower an IR file (any stage: frontend, fused, inference form) or an "
                    "engine directory to OUT/model.onnx with external weight data, checked "
                    "with onnx.checker, plus OUT/build_trt.sh (the trtexec command line).")
    p.add_argument("file", metavar="IR_FILE", help="an .irlm file, or an engine directory")
    p.add_argument("--weights", metavar="FILE", action="append", default=[],
                   help="safetensors file(s) holding the graph's params")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    p.add_argument("--target", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx (default), or tensorrt: also build OUT/model.plan")
    p.set_defaults(func=run)


def run(args) -> int:
    from irlm.lowering.onnx.targets import check_target, load_ir, lower_to_target
    check_target(args.target)
    graph = load_ir(args.file, args.weights)
    export, engine = lower_to_target(graph, args.output, args.target)
    print(export.summary() + (f", {engine}" if engine else ""))
    for node in export.custom_nodes:
        print(f"  custom node: {node}")
    return 0
