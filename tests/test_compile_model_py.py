"""``irlm compile model.py``: the input convention (dim 0 batch, dim 1 seq), ``--dims``,
``--static``, and torch.export failures as one located line.  Oracle: the model run by torch,
compared with the compiled graph run by the reference interpreter."""
from __future__ import annotations

import textwrap

import pytest
import torch

from irlm.cli import main as irlm_main
from irlm.interpreter import Interpreter
from irlm.text.parser import parse_file
from irlm.weights import WeightStore

MLP = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 4)

    def forward(self, x):                      # x: [batch, 16]
        return self.down(torch.relu(self.up(x)))


def build_model():
    torch.manual_seed(0)
    return MLP().eval()


def example_inputs():
    return (torch.randn(4, 16),)
'''

GATE = '''
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y * 2
        return y


def build_model():
    return Gate().eval()


def example_inputs():
    return (torch.randn(4, 16),)
'''


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(MLP))
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    return path, ns["build_model"]()


def run_ir(out, module, x):
    g = parse_file(out / "ir" / "00-frontend.irlm")
    store = WeightStore()
    for name, t in module.state_dict().items():
        store.add_tensor(name, t)
    g.weights = store
    return g, Interpreter(g).run([x]).outputs[0]


@pytest.mark.parametrize("flags, batch_range, shape0", [
    ((), (1, 8), None),                       # dim 0 is batch in [1, --max-batch]
    (("--dims", "batch=1:64"), (1, 64), None),
    (("--static",), None, 4),                 # the example's shape, no symbols
])
def test_mlp_compiles_with_the_convention_dims_and_static(mlp, tmp_path, flags, batch_range,
                                                          shape0):
    path, module = mlp
    out = tmp_path / "out"
    assert irlm_main(["compile", str(path), "-o", str(out), *flags]) == 0
    x = torch.randn(shape0 or 5, 16)
    g, got = run_ir(out, module, x)
    if batch_range is None:
        assert not g.dims and g.inputs[0].type.shape == (4, 16)
    else:   # dim 1 is the MLP's in_features: the model fixes it, so it is static
        assert (g.dims["batch"].min, g.dims["batch"].max) == batch_range
        assert g.inputs[0].type.shape[1] == 16
    with torch.no_grad():
        torch.testing.assert_close(got, module(x))


def test_export_failure_is_one_line_at_the_models_line(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(GATE))
    assert irlm_main(["compile", str(path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line_no = textwrap.dedent(GATE).splitlines().index("        if y.sum() > 0:") + 1
    assert lines[0].startswith(f"irlm: error: model.py:{line_no}: torch.export failed on Gate"), err
    assert "hint: data-dependent control flow" in lines[0]
