"""What every adapter needs: the library's array in its own axis order, scored by ensel."""

from __future__ import annotations

import importlib

from .. import score
from .._inputs import InvalidInput, as_tensor
from ..scores import Scores


def require(module: str, extra: str):
    """Imports `module` (the library an adapter plugs into), or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ensel.integrations needs {module}: pip install 'ensel[{extra}]' ({e})") from e


def scores_of(values, layout: str, kind: str = "logits", labels=None, backend: str = "auto") -> Scores:
    """ensel's scores of a library's ensemble output `values` (torch, numpy or DLPack), whose axes
    `layout` names with the letters E (members), N (samples) and K (classes), e.g. "NKE" for
    baal's [N, C, I]. The axes are permuted as a view: the block is never copied whole."""
    x = as_tensor(values)
    if sorted(layout) != ["E", "K", "N"] or x.dim() != 3:
        raise ValueError(f"expected a 3-D array with axes {layout!r} (E members, N samples, K classes), "
                         f"got shape {tuple(x.shape)}")
    x = x.permute(*(layout.index(axis) for axis in "ENK"))
    return score(x, labels, backend=backend, kind=kind)


# The scores that depend only on each member's argmax (its vote).
VOTE_FIELDS = ("mode", "mode_votes", "variation_ratio", "vote_entropy")


def votes_of(probs, layout: str, backend: str = "auto") -> dict:
    """ensel's vote scores (VOTE_FIELDS) of a library's member probabilities `probs`, axes named by
    `layout` as in `scores_of`, read in place with no conversion at all: softmax keeps each row's
    argmax (argmax p = argmax softmax(p)), so the probabilities are scored as if they were logits
    and only the argmax-derived fields are returned -- exactly those of the probabilities (each
    member's argmax in the input's precision, lowest class on ties, as numpy's argmax). Invalid
    values are refused as probabilities (ValueError naming member and sample)."""
    x = as_tensor(probs)
    if sorted(layout) != ["E", "K", "N"] or x.dim() != 3:
        raise ValueError(f"expected a 3-D array with axes {layout!r} (E members, N samples, K classes), "
                         f"got shape {tuple(x.shape)}")
    x = x.permute(*(layout.index(axis) for axis in "ENK"))
    try:
        s = score(x, backend=backend)
    except InvalidInput as e:
        raise e.restated("probs", x[e.member, e.sample]) from None
    return {name: getattr(s, name) for name in VOTE_FIELDS}
