"""The engine beneath :mod:`mll.functional`: how every head's loss is computed, at every scale.

The public maths (:mod:`mll.functional`) says *what* a margin, a scale or a loss is; the engine says *how* it runs —
checks, the dense path's fused autograd, the chunk kernel, its compiled body, the collectives and the ranks'
agreement. Nothing here imports :mod:`mll.functional`'s public modules or :mod:`mll.nn`: the imports run one way,
``mll.nn → mll.functional → mll.functional._engine`` (``tests/test_architecture.py``; ``docs/architecture.md`` draws
the data flow). Private to the library: :mod:`mll.nn` and :mod:`mll.functional` import from the modules below by
name; users call the public functions.

Modules, from the ground up:

- ``numerics``: dtypes (work, accumulation), ε, and which autograd mode a step is in.
- ``checks``: argument and input checks, with the messages users see; value checks on or off.
- ``normalization``: L2 normalisation, its backward folded into the weight gradient in place, folded cosines.
- ``dense``: the dense path's autograd — scale and target logits written in one pass (``ScaledTargetReplace``).
- ``targets``: targets in the kernel's form (class indices, few-hot pairs, dense soft targets) and conversions.
- ``accumulate``: adding a chunked backward's weight gradient into an existing ``.grad`` chunk by chunk.
- ``compiled``: the chunk's elementwise body as pure functions for ``torch.compile``; sub-center pooling.
- ``chunks``: one chunk of classes — its logits from the raw rows, its gradient to features and weights.
- ``kernel``: the chunk kernel — margin cross-entropy over a block of classes with an online log-sum-exp.
- ``class_sums``: Proxy-Anchor's kernel — losses whose terms sum over the batch per class.
- ``distributed``: the collectives (all-gather of uneven rows, reduce-scatter, all-reduce).
- ``agreement``: the ranks agree on their checks before a collective step; the checks every sharded call shares.
- ``block``: the global batch as one rank's block sees it (statistics, per-row losses back to their ranks).
"""
