"""The active-learning layer: the paper's system built on the scoring core.

    data        digits, CIFAR-10/100, ImageFolder (local files only)
    models      torchvision ResNets and DenseNet, small-image stem
    training    SGD runs that keep every epoch's checkpoint (the implicit ensemble)
    ensembles   which (run, epoch) checkpoints form an acquisition ensemble
    inference   each checkpoint's logits over the pool streamed into an ensel.Accumulator
    rundir      the run directory: its lock (one run at a time), config claim and subsets
    stages      the loop's stages: train and evaluate, score the pool, acquire
    loop        the selection loop (build_up, compress, pretrain) in a resumable run directory
    consensus   top-1 agreement of consecutive checkpoints (paper Fig. 2)
    report      tables and plots of a run directory
    commands    `ensel demo|run|transfer|consensus`

The layer uses the core (`ensel.score`, `ensel.Accumulator`, `ensel.distributed`); the core never
imports it. It needs the `al` extra: `pip install 'ensel[al]'` (torchvision, scikit-learn, tqdm,
matplotlib). Nothing is imported here, so importing a module of this package costs only what
that module needs.
"""

import importlib.util

# module -> the distribution that provides it
_EXTRA = {"torchvision": "torchvision", "sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}


class MissingExtraError(ImportError):
    """The `al` extra is not installed."""


def _check_extra() -> None:
    missing = [dist for module, dist in _EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(
            f"the active-learning layer needs the 'al' extra: pip install 'ensel[al]' (missing: {', '.join(missing)})"
        )


_check_extra()
