"""ensel strategies inside the active-learning libraries people already run.

    baal        ensel.integrations.baal        heuristics for ActiveLearningLoop
    skactiveml  ensel.integrations.skactiveml  query strategies (QueryByCommittee, UncertaintySampling)
    modal       ensel.integrations.modal       strategies for modAL's Committee and ActiveLearner
    small_text  ensel.integrations.small_text  query strategies for PoolBasedActiveLearner
    batchbald   ensel.integrations.batchbald   get_bald_batch

Each module keeps its library's plug-in point, signature and selection rule (tie breaking,
random_state, NaN for labeled samples) and scores with ensel's one-pass kernels: it imports its
library when it is imported, and says which extra to install when the library is missing. The
core never imports this package; this package imports only the core (never ensel.al).
"""
