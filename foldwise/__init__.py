"""foldwise's torch-free leaf: what every other package of the project shares.

``io`` (atomic writes), ``classes`` (the default class list, the ignore index), ``cli`` (one-line errors of
the entry points), ``commands`` (the ``foldwise`` command). It imports numpy, Pillow and the standard library
only, and nothing of ours, so ``submissions`` stays free of torch and ``tta`` of the training stack.
"""
