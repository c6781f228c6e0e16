"""Pass registry, typed options and pipeline text: parsing, printing, errors."""
import pytest

from irlm import Builder, DType, Graph, TensorType
from irlm.errors import IRLMError
from irlm.passes import (NAMED_PIPELINES, Option, PassError, PassInvocation, Pipeline,
                         PipelineSyntaxError, all_passes, get_pass, named_pipeline,
                         parse_pipeline, register_pass, run_pipeline)
from irlm.passes.registry import unregister_pass


@pytest.fixture
def toy_pass():
    """A pass with one option of each kind, registered for the test."""
    seen = {}

    @register_pass("toy-quantize", options={
        "mode": Option(str, "int8", "weight format", choices=["int8", "int4-awq"]),
        "group": Option(int, 128, "elements per scale"),
        "eps": Option(float, 1e-5, "epsilon"),
        "symmetric": Option(bool, False, "symmetric ranges"),
        "note": Option(str, "", "free text"),
    })
    def toy(graph, ctx):
        """Records its options."""
        seen.update(ctx.options.as_dict())

    yield seen
    unregister_pass("toy-quantize")


def test_builtin_passes_are_registered():
    assert {"canonicalize", "cse", "dce"} <= set(all_passes())
    assert get_pass("canonicalize").options["fold_limit"].default == 1024


@pytest.mark.parametrize("text", [
    "",
    "canonicalize",
    "canonicalize,cse,dce",
    "toy-quantize{mode=int4-awq,group=64},dce",
    "toy-quantize{eps=1e-6,symmetric=true}",
    'toy-quantize{note="a, b = {c}"}',
    'toy-quantize{note="say \\"hi\\""}',
    "canonicalize{fold_limit=0},toy-quantize{group=-1}",
])
def test_pipeline_text_round_trips(toy_pass, text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert parse_pipeline(str(p)) == p


def test_whitespace_is_dropped_when_printing(toy_pass):
    assert str(parse_pipeline(" canonicalize , toy-quantize{ group = 64 } ")) == \
        "canonicalize,toy-quantize{group=64}"


def test_options_are_typed_and_replayed(toy_pass):
    g = Graph("t")
    g.set_outputs([g.add_input(TensorType((2,), DType.f32), "x")])
    p = parse_pipeline('toy-quantize{group=64,eps=2,symmetric=true,note="x y"}')
    run_pipeline(g, p)
    assert toy_pass == {"mode": "int8", "group": 64, "eps": 2.0, "symmetric": True,
                        "note": "x y"}
    assert isinstance(toy_pass["eps"], float)
    toy_pass.clear()
    run_pipeline(g, str(p))  # the printed pipeline replays the same run
    assert toy_pass["group"] == 64 and toy_pass["note"] == "x y"


def test_pipeline_built_in_python(toy_pass):
    p = Pipeline.of("canonicalize", PassInvocation.create("toy-quantize", group=32, eps=0.5))
    assert str(p) == "canonicalize,toy-quantize{group=32,eps=0.5}"
    with pytest.raises(PassError, match="must be an integer"):
        PassInvocation.create("toy-quantize", group="32")


@pytest.mark.parametrize("text, column, words", [
    ("canonicalise", 1, ["unknown pass 'canonicalise'", "did you mean 'canonicalize'",
                         "(passes: ", "canonicalize, ", " cse, ", " dce"]),
    ("cse,dcee", 5, ["unknown pass 'dcee'", "did you mean 'dce'"]),
    ("toy-quantize{grop=1}", 14, ["no option 'grop'", "did you mean 'group'",
                                  "eps, group, mode, note, symmetric"]),
    ("toy-quantize{group=abc}", 14, ["'group'", "must be an integer, got 'abc'"]),
    ("toy-quantize{eps=fast}", 14, ["must be a number"]),
    ("toy-quantize{symmetric=yes}", 14, ["must be true or false"]),
    ("toy-quantize{mode=int4}", 14, ["must be one of int8, int4-awq", "did you mean 'int4-awq'"]),
    ("toy-quantize{group=1,group=2}", 22, ["given twice"]),
    ("toy-quantize{group=\"1\"}", 14, ["must be an integer"]),
    ("cse,,dce", 5, ["unexpected ','", "expected a pass name"]),
    ("cse dce", 5, ["unexpected 'dce'", "expected ',' or '{'"]),
    ("cse{", 5, ["unexpected end of pipeline"]),
    ("cse,", 5, ["unexpected end of pipeline", "a pass name"]),
])
def test_pipeline_errors_name_the_column_and_what_is_valid(toy_pass, text, column, words):
    with pytest.raises(PipelineSyntaxError) as e:
        parse_pipeline(text)
    assert isinstance(e.value, IRLMError)
    assert e.value.column == column, str(e.value)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_named_pipelines():
    assert named_pipeline("0") == "" and named_pipeline("O1") == "canonicalize,cse,dce"
    assert named_pipeline("2") == NAMED_PIPELINES["O2"]
    with pytest.raises(PassError, match="unknown optimization level '7'.*O0, O1, O2"):
        named_pipeline("7")
    for text in NAMED_PIPELINES.values():
        parse_pipeline(text)  # every level names registered passes


def test_register_pass_checks_its_arguments():
    with pytest.raises(PassError, match="invalid pass name"):
        register_pass("bad name")
    with pytest.raises(PassError, match="invalid option name"):
        register_pass("ok", options={"not-an-identifier": Option(int, 1)})
    with pytest.raises(PassError, match="must be an Option"):
        register_pass("ok", options={"n": 1})
    with pytest.raises(TypeError, match="option type"):
        Option(list, [])
    with pytest.raises(PassError, match="must be one of"):
        Option(str, "c", choices=["a", "b"])


def test_a_name_cannot_be_taken_twice_from_different_files(toy_pass):
    import types
    fake = types.FunctionType((lambda g: None).__code__, {}, "elsewhere")
    with pytest.raises(PassError, match="already registered"):
        register_pass("toy-quantize", source="/somewhere/else.py:1")(fake)


def test_required_options(toy_pass):
    @register_pass("needs-size", options={"size": Option(int, None, "tensor-parallel size")})
    def needs(graph, ctx):
        """needs a size"""

    try:
        with pytest.raises(PipelineSyntaxError, match="needs option 'size'"):
            parse_pipeline("needs-size")
        assert str(parse_pipeline("needs-size{size=2}")) == "needs-size{size=2}"
    finally:
        unregister_pass("needs-size")


def test_class_passes_get_options_as_constructor_arguments():
    calls = []

    @register_pass("scaled", options={"factor": Option(int, 2)})
    class Scaled:
        """A class-based pass."""

        def __init__(self, factor):
            self.factor = factor

        def run(self, graph, ctx):
            calls.append(self.factor)
            ctx.stats.bump("runs")

    try:
        g = Graph("t")
        g.set_outputs([g.add_input(TensorType((2,), DType.f32), "x")])
        report = run_pipeline(g, "scaled{factor=3},scaled")
        assert calls == [3, 2]
        assert [s.stats.counters["runs"] for s in report.stages] == [1, 1]
    finally:
        unregister_pass("scaled")


def test_one_argument_pass_functions():
    @register_pass("just-graph")
    def just_graph(graph):
        """takes only the graph"""
        graph.name = "renamed"

    try:
        g = Graph("t")
        g.set_outputs([g.add_input(TensorType((2,), DType.f32), "x")])
        run_pipeline(g, "just-graph")
        assert g.name == "renamed"
    finally:
        unregister_pass("just-graph")


from hypothesis import given, settings, strategies as st  # noqa: E402

from irlm.passes.options import format_value  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(group=st.integers(-10**12, 10**12),
       eps=st.floats(allow_nan=False, allow_infinity=True),
       symmetric=st.booleans(),
       note=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_any_option_values_print_and_parse_back(group, eps, symmetric, note):
    @register_pass("prop-pass", options={
        "group": Option(int, 0), "eps": Option(float, 0.0), "symmetric": Option(bool, False),
        "note": Option(str, ""),
    })
    def prop(graph, ctx):
        """property test"""

    try:
        inv = PassInvocation.create("prop-pass", group=group, eps=eps, symmetric=symmetric,
                                    note=note)
        parsed = parse_pipeline(str(Pipeline((inv,)))).passes[0]
        assert parsed.given == {"group": group, "eps": eps, "symmetric": symmetric,
                                "note": note}
        assert str(parsed) == str(inv)
        assert format_value(note) == inv.options[3].text
    finally:
        unregister_pass("prop-pass")
