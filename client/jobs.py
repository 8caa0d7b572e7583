"""What a site does in each phase of a run, on its own rows; each job returns aggregates only."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.correction_store import (
    CorrectionRefused,
    check_writable,
    load_correction,
    save_correction,
)
from client.data import SiteData, read_site_data
from client.site import SchemaMismatch, SiteSettings
from client.source_model_store import model_digest, model_document, save_source_model
from client.split import Split, split_site
from shared import protocol
from shared.preprocessing import TabularPreprocessor, summarize
from shared.schema import Feature, Schema, load_schema
from shared.settings import SettingsError

# torch, scipy and scikit-learn are imported inside the phases that need them: at a deployed
# site every message starts a fresh ClientApp process, and a training round needs only torch.

log = logging.getLogger(__name__)

Metrics = dict[str, float | list[float]]


@dataclass
class SiteRows:
    """A site's validated rows and its split for this run (same on every message)."""

    site: SiteSettings
    schema: Schema
    data: SiteData
    split: Split
    site_feature_defs: list[Feature] = field(default_factory=list)

    @property
    def shared(self) -> pd.DataFrame:
        """The shared feature columns of all rows."""
        return self.data.features[list(self.data.shared_columns)]

    @property
    def own(self) -> pd.DataFrame:
        """The site-only feature columns of all rows (possibly none)."""
        return self.data.features[list(self.data.site_columns)]


SPLIT_STATE = "fedadapt-split"


def open_site(
    site: SiteSettings, config: Mapping[str, Any], state: RecordDict | None = None
) -> SiteRows:
    """Read, validate and split the site's file as the server's config says.

    The split is kept in ``state`` (Flower's per-node ``context.state``, which stays at the
    site) and reused while the file and the split settings are unchanged.

    Raises
    ------
    SchemaMismatch
        If the site's schema differs from the server's.
    DataError
        If the file does not fit the schema.
    """
    schema = load_schema(site.schema or str(config["schema"]))
    if schema.digest() != config["schema-digest"]:
        raise SchemaMismatch(
            f"the site's schema {schema.name!r} (version {schema.version}) differs from the "
            "server's: use the same schema file on both sides"
        )
    data = read_site_data(site.data_file, schema, site.site_features)
    split = _cached_split(data, config, state)
    log.info("site %s: %d rows, %d train, %d held-out", site.name, data.n_rows,
             len(split.train), len(split.test))
    return SiteRows(site, schema, data, split, list(schema.resolve_site_features(
        list(site.site_features))))


def _cached_split(
    data: SiteData, config: Mapping[str, Any], state: RecordDict | None
) -> Split:
    stat = data.path.stat()
    key = "|".join(str(v) for v in (
        config["protocol"], config["split-seed"], config["test-fraction"], data.path,
        stat.st_size, stat.st_mtime_ns, data.n_rows,
    ))
    cached = state.config_records.get(SPLIT_STATE) if state is not None else None
    if cached is not None and cached.get("key") == key:
        log.debug("split reused from the node's state")
        return Split(train=np.asarray(cached["train"], dtype=np.int64),
                     test=np.asarray(cached["test"], dtype=np.int64))
    log.info("split computed (%s)", "state had another split" if cached is not None else
             "no split in the node's state yet")
    split = split_site(
        data,
        protocol=str(config["protocol"]),
        seed=int(config["split-seed"]),
        test_fraction=float(config["test-fraction"]),
    )
    if state is not None:
        state[SPLIT_STATE] = ConfigRecord({
            "key": key, "train": [int(i) for i in split.train],
            "test": [int(i) for i in split.test],
        })
    return split


def stats_job(rows: SiteRows) -> Metrics:
    """Phase 1: counts and sums of the shared features over the training rows."""
    check_writable(rows.site.site_dir)  # fail before training, not after it
    train = rows.split.train
    summary: Metrics = dict(summarize(rows.shared.iloc[train], rows.schema.shared_features))
    y = rows.data.label[train]
    summary.update({
        "num-examples": float(len(train)),
        "n-test": float(len(rows.split.test)),
        "label-negative": float(len(y) - y.sum()),
        "label-positive": float(y.sum()),
    })
    return summary


def _prep(rows: SiteRows, config: Mapping[str, Any]) -> TabularPreprocessor:
    return TabularPreprocessor.from_dict(
        json.loads(str(config["preprocessing"])), list(rows.schema.shared_features)
    )


def _source(rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any]) -> tuple[
    Any, np.ndarray
]:
    """The source model loaded with ``arrays`` and the shared inputs of every row."""
    import torch

    from shared.source_model import build_model, load_arrays

    torch.set_num_threads(1)  # see client.client_app: tiny models, shared cores

    x = _prep(rows, config).transform(rows.shared)
    model = build_model(str(config["model"]), x.shape[1], int(config["hidden-units"]))
    load_arrays(model, arrays)
    return model, x


def _check_training_config(config: Mapping[str, Any]) -> None:
    """Refuse training settings no ServerApp of ours sends.

    A round of no steps would still be charged to the privacy ledger; a negative count
    breaks the schedule.

    Raises
    ------
    SettingsError
        Naming the setting.
    """
    problems = []
    if int(config.get("local-epochs", 1)) < 1:
        problems.append("local-epochs must be at least 1")
    if int(config.get("batch-size", 0)) < 0:
        problems.append("batch-size must not be negative")
    if not float(config.get("learning-rate", 1.0)) > 0:
        problems.append("learning-rate must be positive")
    if problems:
        raise SettingsError("the train message asks for " + "; ".join(problems))


def train_job(
    rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any], run_id: int | None = None
) -> tuple[ArrayRecord, Metrics]:
    """Phase 2, one round: train the source model on the training rows.

    With ``dp = "record"`` in the config: DP-SGD (:func:`_train_job_dp`); ``run_id`` (the
    message's) names the run in the site's privacy ledger. With ``dp = "client"``: plain
    training, then the model update clipped (:func:`clip_update`).
    """
    _check_training_config(config)
    mode = config.get("dp", "off")
    if mode == "client":
        return _train_job_client_dp(rows, arrays, config)
    if mode != "off":
        return _train_job_dp(rows, arrays, config, _run_id(config, run_id))
    from client.train import train_local
    from shared.source_model import to_arrays

    model, x = _source(rows, arrays, config)
    train = rows.split.train
    global_loss, train_loss = train_local(
        model, x[train], rows.data.label[train],
        epochs=int(config["local-epochs"]),
        lr=float(config["learning-rate"]),
        batch_size=int(config["batch-size"]),
        weight_decay=float(config["weight-decay"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        # The round number, counted over a resumed run too (the same seed as without a break).
        seed=int(config["split-seed"]) * 1000 + (protocol.absolute_round(config) or 0),
    )
    metrics: Metrics = {
        "num-examples": float(len(train)), "train-loss": train_loss, "global-loss": global_loss,
    }
    return to_arrays(model), metrics


def _train_job_client_dp(
    rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any]
) -> tuple[ArrayRecord, Metrics]:
    """One FedAvg / FedProx round under client-level DP: train, then clip the model update.

    The trained weights minus the received ones are scaled to L2 norm at most ``dp-clip``
    (over all arrays together) here, inside the train job, so the reply client.egress builds,
    and client.audit_log records, is exactly what is sent. Flower's ``fixedclipping_mod`` does
    the same clipping but is not used: as a ClientApp mod it would change the reply after the
    site's audit log recorded it, and it raises on messages without its ``clipping_norm`` key
    (stats, adapt, evaluate). The coordinator adds the noise (Flower's
    ``DifferentialPrivacyClientSideFixedClipping``, server.client_dp); the reply's
    ``unit-weight`` of 1.0 makes FedAvg's average uniform, as that noise assumes.
    """
    from shared import protocol
    from shared.settings import SettingsError

    clip = float(config.get("dp-clip", 0.0))
    if not clip > 0:
        raise SettingsError("dp = 'client' needs dp-clip > 0 in the train message")
    flower_clip = config.get("clipping_norm")  # what Flower's wrapper sends: the same norm
    if flower_clip is not None and float(flower_clip) != clip:
        raise SettingsError(f"the train message's clipping_norm {flower_clip} differs from "
                            f"its dp-clip {clip}: refused")
    trained, metrics = train_job(rows, arrays, {**config, "dp": "off"})
    return clip_update(trained, arrays, clip), {**metrics, protocol.UNIT_WEIGHT: 1.0}


def clip_update(trained: ArrayRecord, received: ArrayRecord, clip: float) -> ArrayRecord:
    """``received + update * min(1, clip / ||update||)`` with ``update = trained - received``.

    Flower's own helper (``compute_clip_model_update``, the one ``fixedclipping_mod`` and the
    server-side wrapper use); the norm is over every array together. Names, order, shapes and
    dtypes of ``trained`` are kept.
    """
    from flwr.app import Array
    from flwr.supercore.differential_privacy import compute_clip_model_update

    names = list(trained.keys())
    new = [np.array(trained[k].numpy(), copy=True) for k in names]
    old = [received[k].numpy() for k in names]
    compute_clip_model_update(param1=new, param2=old, clipping_norm=clip)
    return ArrayRecord({k: Array(np.asarray(v, dtype=trained[k].numpy().dtype))
                        for k, v in zip(names, new, strict=True)})


def newton_job(
    rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any], run_id: int | None = None
) -> tuple[ArrayRecord, Metrics]:
    """Phase 2, one Newton round: loss, gradient and Hessian sums over the training rows.

    Sums over the rows at the received weights, nothing trained here: the coordinator adds
    them over the sites and takes the step (``shared.newton``). With ``dp = "record"``: each
    row's contributions bounded, Gaussian noise added (:func:`_newton_job_dp`).
    """
    from flwr.app import Array

    from shared import newton

    theta = newton.parameters(arrays)
    x = _prep(rows, config).transform(rows.shared)
    train = rows.split.train
    if config.get("dp", "off") != "off":
        return _newton_job_dp(rows, x[train], theta, config, _run_id(config, run_id))
    sums = newton.site_sums(x[train], rows.data.label[train], theta)
    reply = ArrayRecord({newton.GRAD: Array(sums.grad), newton.HESS: Array(newton.pack(sums.hess))})
    return reply, {"num-examples": float(sums.n), "loss-sum": sums.loss}


def _run_id(config: Mapping[str, Any], run_id: int | None) -> int:
    """The run the ledger charges: the message's run id (the config's when not given)."""
    return int(run_id) if run_id is not None else int(config.get("run-id", 0))


def _dp_prepare(rows: SiteRows, config: Mapping[str, Any], run_id: int, sample_rate: float,
                steps: int) -> tuple[Any, Any, Any]:
    """The DP request, the round's calibrated mechanism and the spend it was charged as.

    Raises ``client.policy.PolicyRefusal`` when the round would exceed a budget.
    """
    from client import privacy

    dp = privacy.dp_config(config)
    prepared = privacy.prepare_round(rows.site, config, run_id, sample_rate, steps)
    assert dp is not None and prepared is not None  # dp is on here
    return dp, *prepared


def _dp_metrics(spend: Any) -> Metrics:
    return {"dp-epsilon": float(spend.epsilon), "dp-delta": float(spend.delta)}


def _train_job_dp(
    rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any], run_id: int
) -> tuple[ArrayRecord, Metrics]:
    """One FedAvg / FedProx round with DP-SGD (``client.train.train_local_dp``).

    The losses the reply normally carries are computed on the rows without noise, so they
    are withheld (sent as 0.0; the coordinator does not report them under DP).
    """
    from client.train import dp_schedule, train_local_dp
    from shared.source_model import to_arrays

    model, x = _source(rows, arrays, config)
    train = rows.split.train
    epochs, batch = int(config["local-epochs"]), int(config["batch-size"])
    q, steps = dp_schedule(len(train), batch, epochs)
    dp, plan, spend = _dp_prepare(rows, config, run_id, q, steps)
    train_local_dp(
        model, x[train], rows.data.label[train], epochs=epochs,
        lr=float(config["learning-rate"]), batch_size=batch,
        weight_decay=float(config["weight-decay"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)), clip=dp.clip,
        noise_multiplier=plan.noise_multiplier,
    )
    metrics: Metrics = {"num-examples": float(len(train)), "train-loss": 0.0,
                        "global-loss": 0.0, **_dp_metrics(spend)}
    return to_arrays(model), metrics


def _newton_job_dp(
    rows: SiteRows, x: np.ndarray, theta: np.ndarray, config: Mapping[str, Any], run_id: int
) -> tuple[ArrayRecord, Metrics]:
    """A Newton round under record-level DP: bounded rows, then one Gaussian mechanism.

    The loss, gradient and Hessian sums are noised together (sample rate 1, one step per
    round), as ``shared.newton.noised_sums`` describes.
    """
    import secrets

    from flwr.app import Array

    from client import privacy
    from shared import newton

    dp, plan, spend = _dp_prepare(rows, config, run_id, 1.0, 1)
    bounds = (dp.clip, privacy.HESS_FACTOR * dp.clip ** 2, privacy.LOSS_BOUND)
    sums = newton.clipped_site_sums(x, rows.data.label[rows.split.train], theta, *bounds)
    loss, grad, hess = newton.noised_sums(sums, plan.noise_multiplier, bounds,
                                          np.random.default_rng(secrets.randbits(128)))
    reply = ArrayRecord({newton.GRAD: Array(grad), newton.HESS: Array(hess)})
    return reply, {"num-examples": float(sums.n), "loss-sum": loss, **_dp_metrics(spend)}


def _model_document(
    rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole source model as this site uses it; its digest binds the correction."""
    return model_document(arrays, {
        "run-id": int(config.get("run-id", 0)), "repeat": int(config.get("repeat", 0)),
        "site-name": rows.site.name, "site-features": list(rows.site.site_features),
        "schema": str(config["schema"]), "schema-digest": rows.schema.digest(),
        "model": str(config["model"]), "hidden-units": int(config["hidden-units"]),
        "preprocessing": json.loads(str(config["preprocessing"])),
    })


def adapt_job(rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any]) -> tuple[
    Metrics, dict[str, str]
]:
    """Phase 3: choose and fit the site's final model on its training rows; store it sealed."""
    from client.adapt import fit_correction
    from shared.correction import adapted_logit
    from shared.metrics import binary_metrics, sigmoid
    from shared.source_model import predict_logit

    model, x = _source(rows, arrays, config)
    offset = predict_logit(model, x)
    train, test = rows.split.train, rows.split.test
    correction = fit_correction(
        x[train], rows.own.iloc[train], offset[train], rows.data.label[train],
        rows.site_feature_defs, folds=int(config["cv-folds"]), seed=int(config["split-seed"]),
    )
    document = _model_document(rows, arrays, config)
    digest = model_digest(document)
    save_correction(rows.site.site_dir, rows.site.name, digest, correction.to_dict())
    save_source_model(rows.site.site_dir, document)
    alpha = correction.alpha(x[test], rows.own.iloc[test], rows.site_feature_defs,
                             offset[test])
    held_out = binary_metrics(rows.data.label[test], sigmoid(adapted_logit(offset[test], alpha)))
    cv = correction.cv
    nan = float("nan")
    metrics: Metrics = {
        "num-examples": float(len(train)),
        "applied": float(correction.applied),
        "strength": float(correction.strength) if correction.strength is not None else -1.0,
        "source-weight": correction.source_weight,
        "cv-log-loss-source": cv.get("cv_log_loss_source", nan),
        "cv-log-loss": cv.get("cv_log_loss", nan),
        "cv-log-loss-se": cv.get("cv_log_loss_se", nan),
        "cv-auc-source": cv.get("cv_auc_source", nan),
        "cv-auc": cv.get("cv_auc", nan),
        "cv-log-loss-local": cv.get("cv_log_loss_local", nan),
        "cv-auc-local": cv.get("cv_auc_local", nan),
        "folds": cv.get("folds", 0.0),
        "candidates": cv.get("candidates", 0.0),
        "test-auc": held_out["auc"],
        "test-log-loss": held_out["log_loss"],
    }
    return metrics, _model_texts(correction)


def _model_texts(correction: Any, status: str | None = None) -> dict[str, str]:
    """The site record's words about its model: status, choice and reason."""
    from shared import protocol

    return {
        protocol.CORRECTION_STATUS: status or (
            "applied" if correction.applied else f"not applied: {correction.reason}"),
        protocol.MODEL_CHOICE: correction.choice,
        protocol.MODEL_REASON: correction.reason,
    }


def evaluate_job(rows: SiteRows, arrays: ArrayRecord, config: Mapping[str, Any]) -> tuple[
    Metrics, dict[str, str]
]:
    """Phase 4: held-out metrics of local-only, source and adapted models."""
    from client.local_model import fit_predict_local
    from shared.correction import Correction, adapted_logit
    from shared.metrics import binary_metrics, paired_auc_difference, reliability, sigmoid
    from shared.protocol import PAIRS
    from shared.source_model import predict_logit

    model, x = _source(rows, arrays, config)
    offset = predict_logit(model, x)
    train, test = rows.split.train, rows.split.test
    y_test = rows.data.label[test]
    features = [*rows.schema.shared_features, *rows.site_feature_defs]
    p_local = fit_predict_local(
        rows.data.features.iloc[train], rows.data.label[train], rows.data.features.iloc[test],
        features, folds=int(config["cv-folds"]), seed=int(config["split-seed"]),
    )
    fallback = 0.0
    try:
        digest = model_digest(_model_document(rows, arrays, config))
        state = load_correction(rows.site.site_dir, rows.site.name, digest)
        correction = Correction.from_dict(state)
        alpha = correction.alpha(x[test], rows.own.iloc[test], rows.site_feature_defs,
                             offset[test])
        status = None
    except CorrectionRefused as err:
        log.warning("site %s: correction refused (%s); using the source model", rows.site.name,
                    err.reason)
        correction = Correction.none(list(rows.site.site_features))
        alpha = np.zeros(len(test))
        status = f"refused ({err.reason}): fell back to the source model"
        fallback = 1.0
    metrics: Metrics = {
        "num-examples": float(len(test)),
        "n-train": float(len(train)),
        "n-test": float(len(test)),
        "positives-test": float(y_test.sum()),
        "correction-applied": float(correction.applied),
        "correction-strength": (
            float(correction.strength) if correction.strength is not None else -1.0
        ),
        "correction-fallback": fallback,
        "source-weight": correction.source_weight,
    }
    risks = {"local": p_local, "source": sigmoid(offset[test]),
             "adapted": sigmoid(adapted_logit(offset[test], alpha))}
    for method, p in risks.items():
        for k, v in binary_metrics(y_test, p).items():
            if k not in ("n", "positives"):
                metrics[f"{method}.{k}"] = v
        curve = reliability(y_test, p)
        metrics.update({f"{method}.rel_predicted": curve["predicted"],
                        f"{method}.rel_observed": curve["observed"],
                        f"{method}.rel_rows": curve["rows"]})
    for a, b in PAIRS:
        diff, low, high = paired_auc_difference(y_test, risks[a], risks[b],
                                                seed=int(config["split-seed"]))
        metrics.update({f"diff.{a}-{b}.auc": diff, f"diff.{a}-{b}.auc_lo": low,
                        f"diff.{a}-{b}.auc_hi": high})
    return metrics, _model_texts(correction, status)
