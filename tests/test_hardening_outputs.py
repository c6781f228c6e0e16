"""Outputs are written safely (issue 21, findings 2 and 10): never through a symlink already in
the output directory, never into the source model's directory, never into a foreign non-empty
directory without --force; weights get the umask's mode like every other file; a full disk
(here: the process's file-size limit) is one line naming the file and leaves no partial file."""
from __future__ import annotations

import os
import resource
import signal
import stat
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.lowering.engine_format import WEIGHTS_FILE, load_engine, write_engine  # noqa: E402
from irlm.safe_io import OutputError  # noqa: E402

from test_hardening_engine import tiny_graph  # noqa: E402

IR_FILE = Path(__file__).parent / "filecheck" / "text" / "symbolic-dims.irlm"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok, model):
    d = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def compile_to(hf_dir, out, *flags) -> int:
    return irlm_main(["compile", "--hf", str(hf_dir), "-o", str(out), "--max-seq", "64",
                      "-O0", *flags])


@pytest.fixture(scope="module")
def compiled_over_links(hf_dir, tmp_path_factory):
    """One compile into an OUT seeded with symlinks to files (and a directory) elsewhere."""
    tmp = tmp_path_factory.mktemp("links")
    victims = {name: tmp / f"victim-{name}" for name in ("plan.irlm", "engine.json",
                                                         "tokenizer.json")}
    out = tmp / "out"
    out.mkdir()
    for name, victim in victims.items():
        victim.write_text("precious\n")
        (out / name).symlink_to(victim)
    (tmp / "elsewhere").mkdir()
    (out / "ir").symlink_to(tmp / "elsewhere")
    assert compile_to(hf_dir, out) == 0
    return out, victims, tmp / "elsewhere"


@pytest.mark.slow
def test_symlinks_in_the_output_directory_are_replaced_not_followed(compiled_over_links):
    """Old behaviour: compile overwrote the targets of OUT/plan.irlm and OUT/engine.json."""
    out, victims, elsewhere = compiled_over_links
    for name, victim in victims.items():
        assert victim.read_text() == "precious\n"
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert list(elsewhere.iterdir()) == []
    assert not (out / "ir").is_symlink() and (out / "ir" / "00-frontend.irlm").is_file()
    load_engine(out)


@pytest.mark.slow
def test_foreign_non_empty_directory_needs_force(compiled_over_links, tmp_path, capsys):
    """Old behaviour: a directory holding other files was silently written into."""
    from irlm.compilation.driver import compile_output_owns
    from irlm.safe_io import prepare_output_dir
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert compile_to(compiled_over_links[0], out) == 1
    err = capsys.readouterr().err
    assert "not empty and not an irlm output (it holds notes.txt)" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert prepare_output_dir(out, flag="-o", force=True, sources=[],
                              owned=compile_output_owns) == out
    # an earlier compile's output is the compile's own: writing into it again needs no --force
    earlier = compiled_over_links[0]
    assert all(compile_output_owns(p.name) for p in earlier.iterdir())
    assert prepare_output_dir(earlier, flag="-o", force=False, sources=[],
                              owned=compile_output_owns) == earlier


def test_the_source_directory_is_never_written(hf_dir, tmp_path, capsys):
    """Old behaviour: -o equal to the --hf directory rewrote its tokenizer_config.json."""
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    for flags in ((), ("--force",)):
        assert compile_to(hf_dir, hf_dir, *flags) == 1
        assert "is the source model's directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before
    link = tmp_path / "link"
    link.symlink_to(hf_dir)
    assert compile_to(hf_dir, link, "--force") == 1
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before


def _modes(out: str, mask: int) -> dict:
    os.umask(mask)
    write_engine(tiny_graph(), Path(out), {"source": "tiny"})
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in Path(out).iterdir()}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_weights_honour_the_umask(bounded, tmp_path, mask):
    """Old behaviour: weights.safetensors was 0600 whatever the umask."""
    modes = bounded(_modes, str(tmp_path / "e"), mask)
    assert modes == {name: 0o666 & ~mask for name in modes}
    assert WEIGHTS_FILE in modes


def _limited(limit: int, fn, *args):
    """Run ``fn`` with the file-size limit at ``limit`` bytes: a write beyond it fails with
    EFBIG, as a full disk fails with ENOSPC (same path through the writers)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return fn(*args)


def _write_big_engine(out: str):
    try:                                              # 256 kB of weights
        write_engine(tiny_graph(size=1 << 16), Path(out), {"source": "tiny"})
    except OutputError as e:
        return str(e), sorted(p.name for p in Path(out).iterdir())
    return None


def test_full_disk_while_writing_weights_is_one_line_naming_the_file(tmp_path):
    # In a fresh interpreter, not a fork of this one: a forked child inherited a lock held by
    # one of the parent's threads and hung in a fresh venv (never in the write under test).
    import json
    import subprocess
    import sys
    out = tmp_path / "e"
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_hardening_outputs import _limited, _write_big_engine; "
            f"print(json.dumps(_limited(4096, _write_big_engine, {str(out)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result is not None, "the oversized weights were written"
    message, left = result
    assert message.startswith(f"{out / WEIGHTS_FILE}: cannot write: ") and "\n" not in message
    assert left == []                                 # no partial weights, no temporary file


def _opt_to(out: str):
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = irlm_main(["opt", str(IR_FILE), "-o", out])
    return rc, err.getvalue(), os.path.exists(out)


def test_opt_leaves_no_empty_output_on_failure(bounded, tmp_path):
    """Old behaviour: ``irlm opt -o`` left an empty (or truncated) file when the write failed."""
    out = tmp_path / "out.irlm"
    rc, err, exists = bounded(_limited, 200, _opt_to, str(out))
    assert rc != 0 and f"{out}: cannot write" in err and not exists
    assert list(tmp_path.iterdir()) == []
    # and through a pre-placed symlink: the link is replaced, its target untouched
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out.symlink_to(victim)
    rc, err, exists = bounded(_opt_to, str(out))
    assert rc == 0 and victim.read_text() == "precious\n" and not out.is_symlink()
    assert "graph @dims" in out.read_text()
