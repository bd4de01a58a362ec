"""The shapes world: a tiny SDXL that draws coloured shapes, so that `tiny` can show whether a prompt was understood.

    world.py     captions (English, Japanese, held-out ones), images, and the judge that reads colour and shape
    training.py  how the shipped weights (jpsdxl/zoo_weights/shapes/) were trained: `jpsdxl train-shapes`

``from jpsdxl import shapes`` gives the world's names (``shapes.judge``, ``shapes.caption_pairs``, ...).
"""

from .world import *  # noqa: F401,F403
from .world import __all__  # noqa: F401
