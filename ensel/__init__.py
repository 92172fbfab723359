"""ensel: score every sample by how much an ensemble of checkpoints disagrees about it.

    s = ensel.score(logits, labels=y)        # logits [E, N, K]: members, samples, classes
    idx = s.top(10_000, by="mutual_info")    # the samples to acquire

See DESIGN.md section 1 for the definitions every backend computes.
"""

from . import backends
from ._fields import ALL_FIELDS, DIRECTION
from .accumulator import Accumulator
from .api import score
from .reference import reference_scores
from .scores import Scores

__all__ = ["ALL_FIELDS", "DIRECTION", "Accumulator", "Scores", "backends", "reference_scores", "score"]
__version__ = "0.1.0"
