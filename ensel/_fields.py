"""The contract's score fields: names, kernel output order, and acquisition direction.

The column order of FLOAT_FIELDS and INT_FIELDS matches csrc/include/ensel/row.h.
"""

FLOAT_FIELDS = (
    "entropy",
    "mean_entropy",
    "mutual_info",
    "variation_ratio",
    "margin",
    "least_confidence",
    "error_count",
    "nll",
    "vote_entropy",  # appended: the older columns keep their kernel indices
)
INT_FIELDS = ("mode", "mode_votes", "forgetting")

# Fields that exist only when labels were given.
LABEL_FIELDS = frozenset({"error_count", "forgetting", "nll"})

# Which end of each score is acquired: "high" (most uncertain first) or "low" (margin).
# mode and mode_votes are not uncertainty scores and have no direction.
DIRECTION = {
    "entropy": "high",
    "mean_entropy": "high",
    "mutual_info": "high",
    "variation_ratio": "high",
    "vote_entropy": "high",
    "margin": "low",
    "least_confidence": "high",
    "error_count": "high",
    "forgetting": "high",
    "nll": "high",
}

# Every field, in the contract's order (docs/contract.md section 1).
ALL_FIELDS = (
    "entropy",
    "mean_entropy",
    "mutual_info",
    "mode",
    "mode_votes",
    "variation_ratio",
    "vote_entropy",
    "margin",
    "least_confidence",
    "error_count",
    "forgetting",
    "nll",
)
