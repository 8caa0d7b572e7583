"""Names both sides agree on: message types, record keys and the keys of every reply."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flwr.app import MessageType

# Message types: one per phase of a run (docs/architecture.md, "Phases of one run").
STATS = f"{MessageType.QUERY}.stats"
TRAIN = MessageType.TRAIN
ADAPT = f"{MessageType.QUERY}.adapt"
EVALUATE = MessageType.EVALUATE
# Secure aggregation (shared.secagg): one message type, its stage named in the SECAGG record.
SECAGG = f"{MessageType.QUERY}.secagg"

# Records in a message's RecordDict (Flower's strategies use "arrays" and "config" too).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SECAGG_RECORD = "secagg"  # a secure sum's stage and its keys, shares or survivors

# The stages of one secure sum (client.secagg), in order; "masked" carries the summed
# message's own records (its config and arrays) and names its type under INNER.
SECAGG_STAGES = ("keys", "share", "masked", "unmask")
STAGE, SUM_ID, INNER, CLIP = "stage", "sum-id", "inner", "clip"
# The masked vector in a masked stage's reply (ArrayRecord ARRAYS), uint64.
MASKED = "masked"
# What each stage's reply carries in its SECAGG record, besides nothing.
SECAGG_REPLY_KEYS = {
    "keys": ("pk1", "pk2"),
    "share": ("to", "boxes"),
    "masked": (),
    "unmask": ("nodes", "shares"),
}

# The weight FedAvg reads from a train reply: examples, never batches.
NUM_EXAMPLES = "num-examples"

# Keys of the "site" ConfigRecord of a reply: identifiers and status, never patient data.
SITE_NAME = "site-name"
SCHEMA_DIGEST = "schema-digest"
CORRECTION_STATUS = "correction-status"
SITE_FEATURES = "site-features"  # names of the features the correction uses, comma-separated
MODEL_CHOICE = "model-choice"  # the site's chosen model (source, local C=1, blend 1/2 ...)
MODEL_REASON = "model-reason"  # why, with its cross-validated numbers

# Metric keys of the phases' replies (besides the per-feature summary keys of phase 1).
TRAIN_METRICS = (NUM_EXAMPLES, "train-loss", "global-loss")
# A Newton round's reply (strategy "newton"): the rows' summed logistic loss at the received
# weights, beside the arrays shared.newton.GRAD and HESS (sums over the same rows).
NEWTON_METRICS = (NUM_EXAMPLES, "loss-sum")
# With dp = "record", a train reply (either kind) also carries the epsilon the site has spent
# in this run so far, this round included, and its delta (client.privacy).
DP_METRICS = ("dp-epsilon", "dp-delta")
# With dp = "client", a train reply also carries this weight, always exactly 1.0: FedAvg
# averages by it (weighted_by_key), so the average is uniform, as the Gaussian noise Flower's
# client-side fixed clipping adds (std noise-multiplier * clip / sites) assumes.
UNIT_WEIGHT = "unit-weight"
CLIENT_DP_METRICS = (UNIT_WEIGHT,)
# A train config's round: Flower's "server-round", counted from the round a resumed run started
# at, plus fedadapt's "round-offset" (the rounds done before the break).
SERVER_ROUND, ROUND_OFFSET = "server-round", "round-offset"


def absolute_round(config: Mapping[str, Any] | None) -> int | None:
    """The training round a train config asks for, counted over a resumed run; None if none."""
    rnd = config.get(SERVER_ROUND) if config is not None else None
    if not isinstance(rnd, int) or isinstance(rnd, bool):
        return None
    offset = config.get(ROUND_OFFSET, 0) if config is not None else 0
    return rnd + (offset if isinstance(offset, int) and not isinstance(offset, bool) else 0)


# The train config key telling a site which kind of training round it is asked for.
STRATEGY = "strategy"
STATS_EXTRA = (NUM_EXAMPLES, "n-test", "label-negative", "label-positive")
# 1.0 in an adapt or evaluate reply of a site that answers only under differential privacy:
# its scores stay at the site, the reply carries nothing else.
WITHHELD = "withheld"
ADAPT_METRICS = (
    WITHHELD, NUM_EXAMPLES, "applied", "strength", "source-weight", "cv-log-loss-source",
    "cv-log-loss", "cv-log-loss-se", "cv-auc-source", "cv-auc", "cv-log-loss-local",
    "cv-auc-local", "folds", "candidates", "test-auc", "test-log-loss",
)
METHODS = ("local", "source", "adapted")
# Per method, on the held-out rows: discrimination, accuracy at 0.5, proper scores, and the
# calibration slope and intercept.
METRIC_NAMES = ("auc", "accuracy", "brier", "log_loss", "cal_slope", "cal_intercept")
# Reliability curve per method: mean predicted risk, observed rate and rows per bin (lists).
RELIABILITY = ("rel_predicted", "rel_observed", "rel_rows")
# Paired comparisons on the same held-out patients: AUC difference and its 95 % interval.
PAIRS = (("adapted", "local"), ("adapted", "source"), ("local", "source"))
PAIR_KEYS = tuple(f"diff.{a}-{b}.{k}" for a, b in PAIRS for k in ("auc", "auc_lo", "auc_hi"))
EVALUATE_METRICS = (
    WITHHELD, NUM_EXAMPLES, "n-train", "n-test", "positives-test", "correction-applied",
    "correction-strength", "correction-fallback", "source-weight",
    *(f"{m}.{k}" for m in METHODS for k in (*METRIC_NAMES, *RELIABILITY)),
    *PAIR_KEYS,
)

# Error codes of a site's error reply (Flower's own codes are 0-8).
SITE_ERROR = 100  # any failure at the site (the reason says which, without cell values)
DATA_ERROR = 101  # the site's file does not fit the run's schema (file:line:column given)
SCHEMA_MISMATCH = 102  # the site's schema (or its site features) differs from the run's
REFUSED = 103  # the site's policy refuses the request; the reason names the rule

# A site's name: it names the site's folders, appears in every report and log, and starts the
# reason of its error replies ("[site NAME] ..."), so it is kept plain.
SITE_NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def site_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a site's name, or None if it can."""
    if re.fullmatch(SITE_NAME_RULE, name):
        return None
    return (f"site name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
