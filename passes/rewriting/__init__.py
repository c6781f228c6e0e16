"""The rewriting machinery every pass uses: :mod:`.rewriter` (the only mutator of a graph; an
:class:`irlm.Builder` that records each change), :mod:`.pattern` (declarative patterns over ops
and values, checked against the op registry) and :mod:`.driver` (the greedy worklist driver
that applies pattern sets).  Re-exported by :mod:`irlm.passes`."""
