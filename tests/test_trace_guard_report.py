"""torch.export failing while it words its guard report (torch 2.11, seen on an H200: a
ValueError inside ``DimConstraints.prettify_results`` for a tiny Llama, in some processes and
not others): the tracer retries with the guards kept as runtime asserts instead of failing.
The failure is injected by patching that method to raise on its first call."""
import torch
from torch import nn
from torch.fx.experimental import symbolic_shapes

from irlm.frontends import trace
from irlm.interpreter import run_graph


class Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids):
        x = torch.nn.functional.one_hot(input_ids, 16).float()
        return self.proj(x).softmax(-1)


def test_a_failing_guard_report_falls_back_to_runtime_asserts(monkeypatch):
    real = symbolic_shapes.DimConstraints.prettify_results
    calls = []

    def prettify_results(self, *a, **k):     # the frame name torch's failure shows
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("not enough values to unpack (expected 3, got 1)")
        return real(self, *a, **k)
    monkeypatch.setattr(symbolic_shapes.DimConstraints, "prettify_results", prettify_results)
    torch.manual_seed(0)
    m = Mix().eval()
    ids = torch.randint(0, 16, (2, 5))
    g = trace(m, {"input_ids": ids}, dims={"batch": (1, 4), "seq": (1, 32)})
    assert calls, "the guard report was never produced: this test injects nothing"
    other = torch.randint(0, 16, (3, 7))             # other sizes: the dims stayed symbolic
    got = run_graph(g, [other]).outputs[0]
    torch.testing.assert_close(got, m(other), rtol=1e-5, atol=1e-6)
