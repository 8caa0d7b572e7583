"""The single door out of a site: every reply a site sends is built and checked here.

A reply may carry only the source model's arrays (train phase, same names and shapes as the
weights the server sent; in a Newton round, the gradient and Hessian sums over the training
rows, whose shapes follow from the model's), aggregate numbers under the keys of
``shared.protocol`` and, in the ``site`` record, the site's name and fixed status strings.
Anything else is refused before it is sent, and so is any number that is not finite (a metric
that is undefined, such as the AUC of one class, is left out of the reply instead). Errors go
out as Flower error replies whose text is known to carry no cell value and no path of the site.
"""

from __future__ import annotations

import logging
import math
import re
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client.data import DataError
from client.policy import PolicyRefusal
from client.site import SchemaMismatch, SiteSettings
from shared import protocol
from shared.errors import FedadaptError
from shared.newton import sum_shapes
from shared.preprocessing import summary_keys
from shared.schema import Feature, SchemaError

log = logging.getLogger(__name__)

MetricValue = float | int | list[float]

MAX_TEXT = 2000


class EgressViolation(FedadaptError, RuntimeError):
    """A reply that would carry something other than allowed aggregates: never sent."""


def allowed_metric_keys(
    message_type: str, shared_features: Sequence[Feature], newton: bool = False,
    site_features: Sequence[Feature] = (),
) -> set[str]:
    """The metric keys a reply to ``message_type`` may carry (a Newton round's if ``newton``).

    A stats reply carries the summaries of the shared features and of the site's own features
    (the group preprocessing of ``shared.groups`` is fitted from them).
    """
    if message_type == protocol.STATS:
        return (set(summary_keys([*shared_features, *site_features]))
                | set(protocol.STATS_EXTRA))
    if message_type == protocol.TRAIN:
        return set(protocol.NEWTON_METRICS if newton else protocol.TRAIN_METRICS) | set(
            protocol.DP_METRICS) | set(protocol.CLIENT_DP_METRICS)
    if message_type == protocol.ADAPT:
        return set(protocol.ADAPT_METRICS)
    if message_type == protocol.EVALUATE:
        return set(protocol.EVALUATE_METRICS)
    if message_type == protocol.SECAGG:  # the masked stage: the epsilon a DP round spent
        return set(protocol.DP_METRICS)
    raise EgressViolation(f"no reply is allowed to messages of type {message_type!r}")


ALLOWED_SITE_KEYS = {
    protocol.STATS: {protocol.SITE_NAME, protocol.SCHEMA_DIGEST, protocol.SITE_FEATURES},
    protocol.TRAIN: set(),
    protocol.SECAGG: {protocol.SITE_NAME, protocol.SCHEMA_DIGEST},  # masked stage of stats
    protocol.ADAPT: {protocol.SITE_NAME, protocol.CORRECTION_STATUS, protocol.SITE_FEATURES,
                     protocol.MODEL_CHOICE, protocol.MODEL_REASON},
    protocol.EVALUATE: {protocol.SITE_NAME, protocol.CORRECTION_STATUS, protocol.SITE_FEATURES,
                        protocol.MODEL_CHOICE, protocol.MODEL_REASON},
}


def build_reply(
    msg: Message,
    *,
    shared_features: Sequence[Feature],
    metrics: Mapping[str, MetricValue],
    arrays: ArrayRecord | None = None,
    site: Mapping[str, str] | None = None,
    site_features: Sequence[Feature] = (),
    secagg: Mapping[str, Any] | None = None,
    answering: str | None = None,
) -> Message:
    """Build the reply to ``msg`` after checking that it holds only allowed aggregates.

    A reply to a secure sum's stage (``query.secagg``) carries the stage's public keys,
    encrypted shares or released shares in its ``secagg`` record, and at the masked stage
    the masked vector (uint64) as its only array, the epsilon a DP round spent and, for
    stats, the site's name: never a plain sum.

    Parameters
    ----------
    msg : Message
        The message being answered; for a train message its ``arrays`` define the only
        array names and shapes a reply may carry.
    shared_features : sequence of Feature
        The schema's shared features (they name the stats phase's summary keys).
    metrics : mapping
        Aggregate numbers under allowed keys, finite; an AUC-like key may be NaN where it is
        undefined, and is then left out of the reply.
    arrays : ArrayRecord, optional
        The locally trained source model weights (train phase only).
    site : mapping, optional
        The site's name and status strings.
    site_features : sequence of Feature
        The site's own features (a stats reply may carry their summaries).
    secagg : mapping, optional
        A secure sum's stage: the values of the reply's ``secagg`` record.
    answering : str, optional
        The type whose rules apply, if not the message's: a secure sum's masked stage
        builds the plain stats or train reply it then masks (``client.secure_reply``);
        that reply is never sent.

    Returns
    -------
    Message
        The reply.

    Raises
    ------
    EgressViolation
        If anything in the reply is not allowed.
    """
    mtype = answering or msg.metadata.message_type
    config = msg.content.config_records.get(protocol.CONFIG)
    newton = config is not None and config.get(protocol.STRATEGY) == "newton"
    allowed = allowed_metric_keys(mtype, shared_features, newton, site_features)
    extra = sorted(set(metrics) - allowed)
    if extra:
        raise EgressViolation(f"reply to {mtype} carries keys that are not allowed: {extra}")
    sent: dict[str, Any] = {key: value for key, value in metrics.items()
                            if _defined(key, value)}
    content = RecordDict({protocol.METRICS: MetricRecord(sent)})
    if mtype == protocol.SECAGG:
        content[protocol.SECAGG_RECORD] = ConfigRecord(_secagg_values(msg, secagg, arrays))
        if arrays is not None:
            content[protocol.ARRAYS] = arrays
    elif arrays is not None:
        if mtype != protocol.TRAIN:
            raise EgressViolation(f"a reply to {mtype} may not carry arrays")
        _check_arrays(arrays, msg.content.array_records.get(protocol.ARRAYS), newton)
        content[protocol.ARRAYS] = arrays
    elif mtype == protocol.TRAIN:
        raise EgressViolation("a train reply must carry the trained source model")
    if site:
        bad = sorted(set(site) - ALLOWED_SITE_KEYS.get(mtype, set()))
        if bad:
            raise EgressViolation(f"reply to {mtype} carries site keys that are not allowed: {bad}")
        for key, text in site.items():
            if not isinstance(text, str) or len(text) > MAX_TEXT:
                raise EgressViolation(f"site field {key!r} must be a short string")
        content[protocol.SITE] = ConfigRecord(dict(site))
    return Message(content=content, reply_to=msg)


def _secagg_values(msg: Message, values: Mapping[str, Any] | None,
                   arrays: ArrayRecord | None) -> dict[str, Any]:
    """A stage's reply values, checked: the stage's keys only, ids and byte strings only."""
    record = msg.content.config_records.get(protocol.SECAGG_RECORD)
    stage = record.get(protocol.STAGE) if record is not None else None
    if stage not in protocol.SECAGG_REPLY_KEYS:
        raise EgressViolation("a secure-aggregation reply to no known stage")
    out = dict(values or {})
    extra = sorted(set(out) - set(protocol.SECAGG_REPLY_KEYS[str(stage)]))
    if extra:
        raise EgressViolation(f"a {stage} stage's reply carries keys that are not allowed: "
                              f"{extra}")
    for key, value in out.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, bytes) or (isinstance(v, int) and not isinstance(v, bool))
                   for v in items):
            raise EgressViolation(f"a {stage} stage's {key!r} is not node ids or bytes")
    if stage == "masked":
        vector = arrays.get(protocol.MASKED) if arrays is not None else None
        if arrays is None or list(arrays) != [protocol.MASKED] or vector is None or (
                vector.dtype != "uint64" or len(vector.shape) != 1):
            raise EgressViolation("a masked stage's reply carries its masked vector only")
    elif arrays is not None:
        raise EgressViolation(f"a {stage} stage's reply may not carry arrays")
    return out


SITE_PREFIX = "[site {}] "


def error_reply(msg: Message, err: BaseException, phase: str,
                site: SiteSettings | str | None = None) -> Message:
    """An error reply whose text carries no cell value and no path of the site.

    fedadapt's own errors (:class:`shared.errors.FedadaptError`: data, schema, settings,
    stored correction, policy...) are sent with their message, which never quotes a cell
    value, the site's paths replaced by names (``<data-file>:12:3``: the site's log has them
    whole); any other exception is sent by type only, and logged at the site with its stack
    frames but without its message (which could quote a value). The reason starts with
    ``[site NAME]`` when the site knows its name, so the coordinator can say who failed.

    Parameters
    ----------
    msg : Message
        The message that failed.
    err : BaseException
        Why.
    phase : str
        The phase, for the log and the reason.
    site : SiteSettings or str, optional
        The site (its paths are scrubbed, its name starts the reason), or only its name.

    Returns
    -------
    Message
        A Flower error reply: code ``REFUSED`` for a policy refusal, ``DATA_ERROR`` for a
        data file that does not fit the schema, ``SCHEMA_MISMATCH`` for a schema that
        differs or cannot be used, ``SITE_ERROR`` otherwise (``shared.protocol``).
    """
    if isinstance(err, PolicyRefusal):
        reason = f"refused by policy rule '{err.rule}': {err}"[:MAX_TEXT]
        log.warning("%s refused by policy rule '%s': %s", phase, err.rule, err)
    elif isinstance(err, FedadaptError):
        reason = f"{type(err).__name__}: {err}"[:MAX_TEXT]
        log.error("%s failed: %s", phase, reason)
    else:
        frames = "".join(traceback.format_tb(err.__traceback__))
        log.error("%s failed with %s (message withheld: it may quote data)\n%s", phase,
                  type(err).__name__, frames)
        reason = f"{type(err).__name__} at the site during {phase}; see the site's log"
    reason = scrub_paths(reason, site if isinstance(site, SiteSettings) else None)
    name = site.name if isinstance(site, SiteSettings) else site
    if name:
        reason = SITE_PREFIX.format(name) + reason
    code = (protocol.REFUSED if isinstance(err, PolicyRefusal)
            else protocol.DATA_ERROR if isinstance(err, DataError)
            else protocol.SCHEMA_MISMATCH if isinstance(err, SchemaMismatch | SchemaError)
            else protocol.SITE_ERROR)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _defined(key: str, value: MetricValue) -> bool:
    """Whether a metric is sent: finite numbers are; an undefined AUC-like one is left out.

    Raises
    ------
    EgressViolation
        For a value that is not a number, or not finite where it cannot be undefined.
    """
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise EgressViolation(f"metric {key!r} is not a number")
    if all(math.isfinite(v) for v in values):
        return True
    if _may_be_undefined(key) and not any(math.isinf(v) for v in values):
        return False
    raise EgressViolation(f"metric {key!r} is not finite: refused")


# An absolute path (a site's file or folder), wherever it stands in a text.
_PATH = re.compile(r"(?<![\w.~>])/[^\s:'\"()\[\],;]+")


def scrub_paths(text: str, site: SiteSettings | None = None) -> str:
    """``text`` with the site's paths replaced by names: nothing local leaves the site.

    The site's data file, folder and policy become ``<data-file>``, ``<site-dir>`` and
    ``<policy>``; any other absolute path ``<site path>``.
    """
    if site is not None:
        known = {str(site.data_file): "<data-file>", str(site.site_dir): "<site-dir>"}
        if site.policy is not None:
            known[str(site.policy)] = "<policy>"
        for path in sorted(known, key=len, reverse=True):
            text = text.replace(path, known[path])
    return _PATH.sub("<site path>", text)


def _may_be_undefined(key: str) -> bool:
    """AUC, calibration and paired differences are undefined where a set has one class."""
    return (key.endswith(("auc", "auc_lo", "auc_hi")) or key.startswith(("cv-", "diff."))
            or ".cal_" in key or key == "test-log-loss")


def _check_arrays(arrays: ArrayRecord, sent: ArrayRecord | None, newton: bool) -> None:
    """The reply's arrays: the source model's names and shapes, or a Newton round's sums."""
    if sent is None:
        raise EgressViolation("a train reply needs the train message's arrays to compare with")
    got = {k: tuple(arrays[k].shape) for k in arrays}
    want = sum_shapes(sent) if newton else {k: tuple(sent[k].shape) for k in sent}
    if got != want:
        what = "a Newton round's sums" if newton else "the source model's"
        raise EgressViolation(f"reply arrays {got} differ from {what} {want}: refused")
    for name in arrays:
        if not np.isfinite(arrays[name].numpy()).all():
            raise EgressViolation(f"reply array {name!r} holds a number that is not finite: "
                                  "refused")
