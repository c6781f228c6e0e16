"""The model runners (the :class:`~irlm.runtime.model_runner.ModelRunner` interface), named
by what they run: :mod:`.interpreter` (an inference-form graph on the reference interpreter,
CPU or any torch device), :mod:`.cpu` (the same graph bound once to torch's CPU kernels: the
default on the CPU), :mod:`.cuda_graphs` (the graph on one GPU with irlm's kernels,
decode steps as CUDA graphs), :mod:`.ranks` (the rank graphs of a tp/pp engine, in lockstep),
:mod:`.hf_reference` (a transformers model, the tests' oracle)."""
