"""ImageNet class names, shipped with the project so nothing is fetched at run time."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

CLASS_INDEX_PATH = Path(__file__).with_name("imagenet_class_index.json")


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 class names in model output order (Keras's names, e.g. 'tench')."""
    index = json.loads(CLASS_INDEX_PATH.read_text(encoding="utf-8"))
    return tuple(index[str(i)][1] for i in range(len(index)))
