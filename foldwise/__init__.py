"""foldwise's torch-free leaf: what every other package of the project shares.

``io`` (atomic writes), ``classes`` (the default class list, the ignore index), ``cli`` (one-line errors of
the entry points). It imports numpy, Pillow and the standard library only, and nothing of ours, so
``submissions`` stays free of torch and ``tta`` of the training stack.
"""

import os

# albumentations asks PyPI for a newer release at import time, and huggingface_hub (through timm) may try
# the hub; no run of ours should touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
