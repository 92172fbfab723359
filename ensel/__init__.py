"""ensel: score every sample by how much an ensemble of checkpoints disagrees about it.

    s = ensel.score(logits, labels=y)        # logits [E, N, K]: members, samples, classes
    idx = s.top(10_000, by="mutual_info")    # the samples to acquire

The scoring core is this package's top level: `score`, `Accumulator` (streaming, resumable),
`score_files` (out of core), `Scores`, `backends`, `distributed` (sharded global top-k). The
active-learning layer built on it is `ensel.al` (the `al` extra); the core never imports it.
docs/contract.md gives the definitions every backend computes.
"""

from . import backends
from ._fields import ALL_FIELDS, DIRECTION
from .accumulator import Accumulator
from .api import score
from .outofcore import score_files
from .reference import reference_scores
from .scores import Scores

__all__ = [
    "ALL_FIELDS", "DIRECTION", "Accumulator", "Scores", "backends", "reference_scores", "score", "score_files",
]  # fmt: skip
__version__ = "0.1.0"
