"""Pass instruments: debugging output that every pass gets for free.

An instrument is told about the pipeline, each pass before and after it runs, and failures;
the pass manager calls them in order.  Built in: print IR before/after passes, dump one
numbered, parseable file per stage, per-pass timing, per-pass and per-pattern statistics, and
(in :mod:`irlm.passes.numerics`) the numerics check against the reference interpreter.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import IO, Iterable, Optional

from irlm.ir import Graph

from .errors import PassError, did_you_mean


class Instrument:
    """Override what you need; every hook defaults to doing nothing."""

    def before_pipeline(self, graph: Graph, pipeline, stage_offset: int) -> None: ...
    def before_pass(self, graph: Graph, stage) -> None: ...
    def after_pass(self, graph: Graph, result) -> None: ...
    def pass_failed(self, graph: Graph, stage, error: BaseException) -> None: ...
    def after_pipeline(self, graph: Graph, report) -> None: ...


def _print_graph(graph: Graph) -> str:
    from irlm.text.printer import print_graph
    text = print_graph(graph)
    return text if text.endswith("\n") else text + "\n"


class PassFilter:
    """Which passes a ``--print-ir-*`` flag selects: names (comma-separated, repeatable) or
    ``all``.  Unknown pass names are an error with a suggestion."""

    def __init__(self, specs: Iterable[str], flag: str = "--print-ir"):
        from .registry import all_passes
        self.all = False
        self.names: set[str] = set()
        known = all_passes()
        for spec in specs:
            for name in (s.strip() for s in spec.split(",")):
                if not name:
                    continue
                if name == "all":
                    self.all = True
                elif name not in known:
                    raise PassError(f"{flag}: unknown pass '{name}'"
                                    + did_you_mean(name, list(known) + ["all"], "passes"))
                else:
                    self.names.add(name)

    def __bool__(self) -> bool:
        return self.all or bool(self.names)

    def __contains__(self, name: str) -> bool:
        return self.all or name in self.names


class PrintIR(Instrument):
    """Print the graph to ``stream`` (stderr) before and/or after selected passes."""

    def __init__(self, before: Optional[PassFilter] = None, after: Optional[PassFilter] = None,
                 stream: Optional[IO[str]] = None):
        self.before, self.after = before, after
        self.stream = stream

    def _emit(self, header: str, graph: Graph) -> None:
        out = self.stream or sys.stderr
        out.write(f"# ----- IR {header} -----\n")
        out.write(_print_graph(graph))
        out.flush()

    def before_pass(self, graph, stage):
        if self.before and stage.name in self.before:
            self._emit(f"before {stage.invocation} (stage {stage.index})", graph)

    def after_pass(self, graph, result):
        if self.after and result.stage.name in self.after:
            self._emit(f"after {result.stage.invocation} (stage {result.stage.index})", graph)

    def pass_failed(self, graph, stage, error):
        if self.after and stage.name in self.after:
            self._emit(f"after {stage.invocation} (stage {stage.index}, FAILED)", graph)


#: the names of the files :class:`DumpIR` writes: ``NN-<pass>.irlm`` (``00-input.irlm``,
#: ``NN-<pass>.failed.irlm``) and :data:`PIPELINE_FILE`
DUMP_FILE = re.compile(r"\d{2,}-[^/]+\.irlm")
PIPELINE_FILE = "pipeline.txt"


class DumpIR(Instrument):
    """Write ``00-input.irlm``, ``01-<pass>.irlm``, ... to a directory: one parseable file
    per stage, so any stage can be fed back to ``irlm opt``.  A pass that fails leaves
    ``NN-<pass>.failed.irlm`` (best effort) for inspection."""

    def __init__(self, directory: os.PathLike | str):
        self.dir = Path(directory)

    def _write(self, name: str, graph: Graph) -> None:
        from irlm.safe_io import make_dir, write_text
        make_dir(self.dir)
        write_text(self.dir / name, _print_graph(graph))

    def before_pipeline(self, graph, pipeline, stage_offset):
        from irlm.safe_io import make_dir, write_text
        make_dir(self.dir)
        write_text(self.dir / PIPELINE_FILE, str(pipeline) + "\n")
        if stage_offset == 0:
            self._write("00-input.irlm", graph)

    def after_pass(self, graph, result):
        self._write(f"{result.stage.index:02d}-{result.stage.name}.irlm", graph)

    def pass_failed(self, graph, stage, error):
        self._write(f"{stage.index:02d}-{stage.name}.failed.irlm", graph)


class Timing(Instrument):
    """A table of wall time per pass (and verifier time) after the pipeline."""

    def __init__(self, stream: Optional[IO[str]] = None):
        self.stream = stream

    def after_pipeline(self, graph, report):
        from rich.table import Table
        total = report.seconds or 1e-12
        table = Table(title="pass timing (wall clock)", title_justify="left")
        table.add_column("stage", justify="right")
        table.add_column("pass")
        table.add_column("time (ms)", justify="right")
        table.add_column("%", justify="right")
        verify = report.input_verify_seconds
        for r in report.stages:
            table.add_row(str(r.stage.index), str(r.stage.invocation), f"{r.seconds * 1e3:.2f}",
                          f"{100 * r.seconds / total:.1f}")
            verify += r.verify_seconds
        if verify:
            table.add_row("", "(verifier)", f"{verify * 1e3:.2f}", f"{100 * verify / total:.1f}")
        table.add_row("", "total", f"{report.seconds * 1e3:.2f}", "100.0")
        for name, seconds in report.instrument_seconds.items():
            if name != type(self).__name__ and seconds >= 5e-4:
                table.add_row("", f"(instrument {name}, not in total)", f"{seconds * 1e3:.2f}",
                              "")
        _console(self.stream).print(table)


class Stats(Instrument):
    """A table of counters per pass (ops created/erased/merged, applications per pattern)."""

    def __init__(self, stream: Optional[IO[str]] = None):
        self.stream = stream

    def after_pipeline(self, graph, report):
        from rich.table import Table
        table = Table(title="pass statistics", title_justify="left")
        table.add_column("stage", justify="right")
        table.add_column("pass")
        table.add_column("counter")
        table.add_column("value", justify="right")
        for r in report.stages:
            rows = sorted(r.stats.counters.items()) + \
                [(f"pattern {name}", n) for name, n in sorted(r.stats.patterns.items())]
            if not rows and r.ops_before == r.ops_after:
                rows = [("(no changes)", 0)]
            else:   # measured, so a pass without counters still shows what it did
                rows.insert(0, ("ops in graph", f"{r.ops_before} → {r.ops_after}"))
            for j, (counter, n) in enumerate(rows):
                table.add_row(str(r.stage.index) if j == 0 else "",
                              str(r.stage.invocation) if j == 0 else "", counter, str(n))
        _console(self.stream).print(table)


def _console(stream):
    from rich.console import Console
    return Console(file=stream or sys.stderr, width=120, highlight=False)
