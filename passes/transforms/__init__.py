"""Generic graph transforms, valid for any graph: ``canonicalize`` (folds and simplifications
through the pattern engine), ``cse``, ``dce`` (the one dead-op predicate is
:func:`irlm.registry.is_dead`)."""
