"""Procedural indoor RGB-D rooms: the embedded default dataset (NYUv2-13 classes, the dataset layout).

``rooms`` builds a furnished room, ``render`` ray-casts views of it (RGB, Kinect-like depth, labels and a
depth teacher's prediction), ``writer`` writes a dataset root. ``python -m kfold.data.synthetic --out DIR``.
"""

from kfold.data.synthetic.render import render_view
from kfold.data.synthetic.rooms import build_room
from kfold.data.synthetic.writer import generate, main

__all__ = ["build_room", "generate", "main", "render_view"]
