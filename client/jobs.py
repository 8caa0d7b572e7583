"""What a site does in each phase of a run, on its own rows; each job returns aggregates only."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.contract import (
    ContractError,
    ModelRequest,
    Request,
    SourceModel,
    SplitPlan,
    TrainRequest,
)
from client.correction_store import (
    CorrectionRefused,
    check_writable,
    load_correction,
    save_correction,
)
from client.data import SiteData, read_site_data
from client.policy import Policy
from client.site import SiteSettings
from client.source_model_store import model_digest, model_document, save_source_model
from client.split import Split, keyed_split, split_key, split_site
from shared import protocol
from shared.preprocessing import summarize
from shared.schema import Feature, Schema

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
    policy: Policy
    seed: int  # of the site's own cross-validation, bootstrap and mini-batch order
    site_feature_defs: list[Feature] = field(default_factory=list)

    @property
    def shared(self) -> pd.DataFrame:
        """The shared feature columns of all rows."""
        return self.data.features[list(self.data.shared_columns)]

    @property
    def own(self) -> pd.DataFrame:
        """The site-only feature columns of all rows (possibly none)."""
        return self.data.features[list(self.data.site_columns)]

    @property
    def private(self) -> bool:
        """Whether the site answers only under differential privacy (its policy's rule)."""
        return self.policy.require_dp


SPLIT_STATE = "fedadapt-split"


def open_site(site: SiteSettings, request: Request, policy: Policy,
              state: RecordDict | None = None) -> SiteRows:
    """Read, validate and split the site's file.

    A deployed site splits with its own secret key and held-out share
    (``client.split.keyed_split``); a simulated one as the run says. The split is kept in
    ``state`` (Flower's per-node ``context.state``, which stays at the site) and reused while
    the file and the split are unchanged.

    Raises
    ------
    DataError
        If the file does not fit the schema.
    """
    data = read_site_data(site.data_file, request.schema, site.site_features)
    plan = request.split
    key = split_key(site.site_dir) if plan.keyed else b""
    split = _cached_split(data, plan, key, state)
    if plan.keyed:
        seed = int.from_bytes(hmac.new(key, b"seed:" + data.digest.encode(),
                                       hashlib.sha256).digest()[:4], "big")
    else:
        seed = int(plan.seed or 0)
    log.info("site %s: %d rows, %d train, %d held-out", site.name, data.n_rows,
             len(split.train), len(split.test))
    return SiteRows(site, request.schema, data, split, policy, seed, list(
        request.schema.resolve_site_features(list(site.site_features))))


def _cached_split(data: SiteData, plan: SplitPlan, key: bytes, state: RecordDict | None
                  ) -> Split:
    """The split of this version of the file under ``plan``, from the node's state if kept."""
    ident = "|".join(str(v) for v in (
        plan.keyed, plan.protocol, plan.seed, plan.test_fraction, data.digest,
        hashlib.sha256(key).hexdigest()[:16] if key else "", data.n_rows,
    ))
    cached = state.config_records.get(SPLIT_STATE) if state is not None else None
    if cached is not None and cached.get("key") == ident:
        log.debug("split reused from the node's state")
        return Split(train=np.asarray(cached["train"], dtype=np.int64),
                     test=np.asarray(cached["test"], dtype=np.int64))
    log.info("split computed (%s)", "state had another split" if cached is not None else
             "no split in the node's state yet")
    if plan.keyed:
        split = keyed_split(data, key, plan.test_fraction, plan.protocol)
    else:
        split = split_site(data, protocol=plan.protocol, seed=int(plan.seed or 0),
                           test_fraction=plan.test_fraction)
    if state is not None:
        state[SPLIT_STATE] = ConfigRecord({
            "key": ident, "train": [int(i) for i in split.train],
            "test": [int(i) for i in split.test],
        })
    return split


def stats_job(rows: SiteRows) -> tuple[Metrics, bool]:
    """Phase 1: counts and sums of the shared and site-only features over the training rows.

    A fixed answer (``client.answers``): computed once per version of the data, split,
    schema and privacy setting, then repeated verbatim. Under the policy's ``require-dp``
    it is released once with Gaussian noise, charged to the site's ledger
    (``client.privacy.release_summary``).

    Returns
    -------
    dict, bool
        The summary, and whether it repeats an answer sent before.
    """
    check_writable(rows.site.site_dir)  # fail before training, not after it
    return _stats_answer(rows)


def summarized_site_features(rows: SiteRows) -> list[Feature]:
    """The site-only features whose sums the stats reply carries (and whose names it gives).

    None at a site that answers only under DP: feature groups train only without DP, so
    their sums would buy nothing and cost the one noisy release its precision. Under a
    ``min-rows`` policy, a feature observed in fewer training rows than that is left out (the
    site is then in no group of it), rather than the whole reply refused: the shared
    features' stats are what every site must send.
    """
    p = rows.policy
    if p.require_dp:
        return []
    if not p.min_rows:
        return list(rows.site_feature_defs)
    train = rows.split.train
    return [f for f in rows.site_feature_defs
            if int(rows.data.features[f.name].iloc[train].notna().sum()) >= p.min_rows]


def _stats_answer(rows: SiteRows) -> tuple[Metrics, bool]:
    from client.answers import answer_key, fixed_answer

    train = rows.split.train
    p = rows.policy
    own = summarized_site_features(rows)
    features = [*rows.schema.shared_features, *own]
    key = answer_key(
        phase="stats", data=rows.data.digest, schema=rows.schema.digest(),
        site_features=[f.name for f in own],
        train=hashlib.sha256(np.asarray(train, dtype=np.int64).tobytes()).hexdigest(),
        test=len(rows.split.test), private=p.require_dp,
        epsilon=p.stats_epsilon if p.require_dp else None,
        delta=p.delta if p.require_dp else None)

    def compute() -> dict[str, Any]:
        y = rows.data.label[train]
        # The site's own features too: their sums give a feature group its preprocessing.
        summary: dict[str, Any] = dict(summarize(
            rows.data.features[[f.name for f in features]].iloc[train], features))
        exact = {"label-negative": [float(len(y) - y.sum())],
                 "label-positive": [float(y.sum())], "n-test": [float(len(rows.split.test))]}
        if not p.require_dp:
            return {**summary, "num-examples": float(len(train)),
                    **{k: v[0] for k, v in exact.items()}}
        import secrets

        from client import privacy

        released, sigma = privacy.release_summary(
            {**summary, **exact}, features, p.stats_epsilon, p.delta,
            np.random.default_rng(secrets.randbits(128)))
        privacy.charge_release(rows.site.site_dir, rows.site.name, key, p.stats_epsilon,
                               p.delta, p.max_epsilon_total, "the stats")
        log.info("site %s: stats released with noise (multiplier %.2f, epsilon %g)",
                 rows.site.name, sigma, p.stats_epsilon)
        return {k: (v if k in summary else v[0]) for k, v in released.items()}

    answer, repeated = fixed_answer(rows.site.site_dir, key, compute)
    return dict(answer), repeated


def examples(rows: SiteRows) -> float:
    """The training row count a reply may carry: the released (noisy) one under DP."""
    if rows.private:
        released = _stats_answer(rows)[0]["num-examples"]
        return float(released[0] if isinstance(released, list) else released)
    return float(len(rows.split.train))


def _source(rows: SiteRows, source: SourceModel) -> tuple[Any, np.ndarray]:
    """The source model loaded with the message's weights and every row's bounded inputs."""
    import torch

    from shared.source_model import build_model, load_arrays

    torch.set_num_threads(1)  # see client.client_app: tiny models, shared cores

    x = source.inputs(rows.schema, rows.shared)
    model = build_model(source.kind, x.shape[1], source.hidden_units)
    load_arrays(model, source.arrays)
    return model, x


def train_job(rows: SiteRows, request: TrainRequest) -> tuple[ArrayRecord, Metrics]:
    """Phase 2, one round: train the source model on the training rows.

    With ``dp = "record"``: DP-SGD (:func:`_train_job_dp`), charged to the ledger under the
    message's run id. With ``dp = "client"``: plain training, then the model update clipped
    (:func:`clip_update`).
    """
    dp = request.dp
    if dp is not None and dp.mode == "record":
        return _train_job_dp(rows, request)
    from client.train import train_local
    from shared.source_model import to_arrays

    model, x = _source(rows, request.source)
    train = rows.split.train
    global_loss, train_loss = train_local(
        model, x[train], rows.data.label[train], epochs=request.local_epochs,
        lr=request.learning_rate, batch_size=request.batch_size,
        weight_decay=request.weight_decay, proximal_mu=request.proximal_mu,
        # The round number, counted over a resumed run too (the same seed as without a break).
        seed=rows.seed * 1000 + (request.round or 0),
    )
    metrics: Metrics = {
        "num-examples": examples(rows), "train-loss": train_loss, "global-loss": global_loss,
    }
    trained = to_arrays(model)
    if dp is not None:  # client-level DP: the coordinator adds the noise to the average
        return clip_update(trained, request.source.arrays, dp.clip), {
            **metrics, protocol.UNIT_WEIGHT: 1.0}
    return trained, metrics


def clip_update(trained: ArrayRecord, received: ArrayRecord, clip: float) -> ArrayRecord:
    """``received + update * min(1, clip / ||update||)`` with ``update = trained - received``.

    Flower's own helper (``compute_clip_model_update``, the one ``fixedclipping_mod`` and the
    server-side wrapper use); the norm is over every array together. Names, order, shapes and
    dtypes of ``trained`` are kept. Done here, inside the train job, so the reply
    client.egress builds, and client.audit_log records, is exactly what is sent (Flower's
    ``fixedclipping_mod`` would change the reply after the audit recorded it).
    """
    from flwr.app import Array
    from flwr.supercore.differential_privacy import compute_clip_model_update

    names = list(trained.keys())
    new = [np.array(trained[k].numpy(), copy=True) for k in names]
    old = [received[k].numpy() for k in names]
    compute_clip_model_update(param1=new, param2=old, clipping_norm=clip)
    return ArrayRecord({k: Array(np.asarray(v, dtype=trained[k].numpy().dtype))
                        for k, v in zip(names, new, strict=True)})


def newton_job(rows: SiteRows, request: TrainRequest) -> tuple[ArrayRecord, Metrics]:
    """Phase 2, one Newton round: loss, gradient and Hessian sums over the training rows.

    Sums over the rows at the received weights, nothing trained here: the coordinator adds
    them over the sites and takes the step (``shared.newton``). With ``dp = "record"``: each
    row's contributions bounded, Gaussian noise added (:func:`_newton_job_dp`).
    """
    from flwr.app import Array

    from shared import newton

    if request.dp is not None and request.dp.mode == "client":
        raise ContractError("client-level DP clips FedAvg / FedProx updates; a Newton round "
                            "has none")
    x = request.source.inputs(rows.schema, rows.shared)
    train = rows.split.train
    offset = None
    if request.group is not None:  # a group extension: the source model's logit is fixed
        theta = newton.parameters(request.group.arrays)
        offset = source_logit(rows, request.source, x)[train]
        x = group_inputs(rows, request.source, x, request.group.features,
                         request.group.preprocessing)
    else:
        theta = newton.parameters(request.source.arrays)
    if request.dp is not None:
        return _newton_job_dp(rows, x[train], theta, request, offset)
    sums = newton.site_sums(x[train], rows.data.label[train], theta, offset)
    reply = ArrayRecord({newton.GRAD: Array(sums.grad), newton.HESS: Array(newton.pack(sums.hess))})
    return reply, {"num-examples": examples(rows), "loss-sum": sums.loss}


def _dp_metrics(spend: Any) -> Metrics:
    return {"dp-epsilon": float(spend.epsilon), "dp-delta": float(spend.delta)}


def _train_job_dp(rows: SiteRows, request: TrainRequest) -> tuple[ArrayRecord, Metrics]:
    """One FedAvg / FedProx round with DP-SGD (``client.train.train_local_dp``).

    The losses the reply normally carries are computed on the rows without noise, so they
    are withheld (sent as 0.0; the coordinator does not report them under DP).
    """
    from client import privacy
    from client.train import dp_schedule, train_local_dp
    from shared.source_model import to_arrays

    model, x = _source(rows, request.source)
    train = rows.split.train
    q, steps = dp_schedule(len(train), request.batch_size, request.local_epochs)
    dp, plan, spend = privacy.prepare_round(rows.site, rows.policy, request, q, steps)
    train_local_dp(
        model, x[train], rows.data.label[train], epochs=request.local_epochs,
        lr=request.learning_rate, batch_size=request.batch_size,
        weight_decay=request.weight_decay, proximal_mu=request.proximal_mu, clip=dp.clip,
        noise_multiplier=plan.noise_multiplier,
    )
    metrics: Metrics = {"num-examples": examples(rows), "train-loss": 0.0,
                        "global-loss": 0.0, **_dp_metrics(spend)}
    return to_arrays(model), metrics


def source_logit(rows: SiteRows, source: SourceModel, x: np.ndarray) -> np.ndarray:
    """The source model's logit of every row (numpy for the logistic model, else torch)."""
    if source.kind == "logreg":
        from shared import newton

        theta = newton.parameters(source.arrays)
        return np.asarray(x @ theta[:-1] + theta[-1], dtype=np.float64)
    from shared.source_model import predict_logit

    model, _ = _source(rows, source)
    return predict_logit(model, x)


def group_inputs(rows: SiteRows, source: SourceModel, x: np.ndarray, features: Any,
                 preprocessing: dict[str, Any]) -> np.ndarray:
    """A group extension's inputs for every row: the source model's, then the group's."""
    from shared.groups import inputs
    from shared.preprocessing import TabularPreprocessor

    prep = TabularPreprocessor.from_dict(preprocessing, list(features))
    return inputs(x, rows.data.features, prep, source.input_bound)


def _newton_job_dp(rows: SiteRows, x: np.ndarray, theta: np.ndarray, request: TrainRequest,
                   offset: np.ndarray | None = None) -> tuple[ArrayRecord, Metrics]:
    """A Newton round under record-level DP: bounded rows, then one Gaussian mechanism.

    The loss, gradient and Hessian sums are noised together (sample rate 1, one step per
    round), as ``shared.newton.noised_sums`` describes.
    """
    import secrets

    from flwr.app import Array

    from client import privacy
    from shared import newton

    dp, plan, spend = privacy.prepare_round(rows.site, rows.policy, request, 1.0, 1)
    bounds = (dp.clip, privacy.HESS_FACTOR * dp.clip ** 2, privacy.LOSS_BOUND)
    sums = newton.clipped_site_sums(x, rows.data.label[rows.split.train], theta, *bounds,
                                    offset=offset)
    loss, grad, hess = newton.noised_sums(sums, plan.noise_multiplier, bounds,
                                          np.random.default_rng(secrets.randbits(128)))
    reply = ArrayRecord({newton.GRAD: Array(grad), newton.HESS: Array(hess)})
    return reply, {"num-examples": examples(rows), "loss-sum": loss, **_dp_metrics(spend)}


def _model_document(rows: SiteRows, request: ModelRequest) -> dict[str, Any]:
    """The whole source model as this site uses it; its digest binds the correction."""
    source = request.source
    return model_document(source.arrays, {
        "run-id": request.run_id, "repeat": request.repeat,
        "site-name": rows.site.name, "site-features": list(rows.site.site_features),
        "schema": rows.schema.source.removeprefix("builtin:"),
        "schema-digest": rows.schema.digest(),
        "model": source.kind, "hidden-units": source.hidden_units,
        "preprocessing": source.preprocessing, "input-bound": source.input_bound,
    })


WITHHELD = ("fitted and kept at the site; its scores are not sent (the site answers only "
            "under differential privacy)")


def withheld(job: Any, rows: SiteRows, request: ModelRequest) -> tuple[Metrics, dict[str, str]]:
    """Under the policy's ``require-dp``: do ``job`` at the site, send the same reply whatever.

    The adapt and evaluate phases compute, without noise, on the site's rows at weights the
    coordinator chose: their scores, the model chosen, even whether the work failed, would
    each tell it something of the rows. The reply is the same constant in every case; the
    outcome is in the site's log and folder.
    """
    try:
        job(rows, request)
    except Exception as err:  # the failure stays at the site, as the scores do
        log.error("site %s: %s failed with %s (kept at the site; the reply says nothing)",
                  rows.site.name, request.phase, type(err).__name__)
    return {protocol.WITHHELD: 1.0}, {protocol.CORRECTION_STATUS: WITHHELD}


def adapt_job(rows: SiteRows, request: ModelRequest) -> tuple[Metrics, dict[str, str]]:
    """Phase 3: choose and fit the site's final model on its training rows; store it sealed.

    Under the policy's ``require-dp`` the cross-validated scores and the choice stay at the
    site (:func:`withheld`).
    """
    if rows.private:
        return withheld(_adapt, rows, request)
    return _adapt(rows, request)


def _adapt(rows: SiteRows, request: ModelRequest) -> tuple[Metrics, dict[str, str]]:
    from client.adapt import fit_correction
    from shared.correction import adapted_logit
    from shared.metrics import binary_metrics, sigmoid
    from shared.source_model import predict_logit

    model, x = _source(rows, request.source)
    offset = predict_logit(model, x)
    train, test = rows.split.train, rows.split.test
    correction = fit_correction(
        x[train], rows.own.iloc[train], offset[train], rows.data.label[train],
        rows.site_feature_defs, folds=request.cv_folds, seed=rows.seed,
        groups=group_offsets(rows, request, x, train),
    )
    document = _model_document(rows, request)
    digest = model_digest(document)
    save_correction(rows.site.site_dir, rows.site.name, digest, correction.to_dict())
    save_source_model(rows.site.site_dir, document)
    log.info("site %s: model chosen: %s", rows.site.name, correction.choice)
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


def group_offsets(rows: SiteRows, request: ModelRequest, x: np.ndarray,
                  train: np.ndarray) -> list[Any]:
    """The extensions of the site's feature groups, as its training rows see them."""
    from client.adapt import GroupOffset

    defs = {f.name: f for f in rows.site_feature_defs}
    out = []
    for ext in request.extensions:
        z = group_inputs(rows, request.source, x, [defs[n] for n in ext.features],
                         ext.preprocessing)
        logit = z[train] @ ext.theta[:-1] + float(ext.theta[-1])
        out.append(GroupOffset(ext, logit, request.source.input_bound))
    return out


def _model_texts(correction: Any, status: str | None = None) -> dict[str, str]:
    """The site record's words about its model: status, choice and reason."""
    return {
        protocol.CORRECTION_STATUS: status or (
            "applied" if correction.applied else f"not applied: {correction.reason}"),
        protocol.MODEL_CHOICE: correction.choice,
        protocol.MODEL_REASON: correction.reason,
    }


def evaluate_job(rows: SiteRows, request: ModelRequest) -> tuple[Metrics, dict[str, str]]:
    """Phase 4: held-out metrics of local-only, source and adapted models.

    Kept in the site's folder (``evaluations/``, `fedadapt site-results`) in every case; sent
    only when the site does not require differential privacy (:func:`withheld`).
    """
    if rows.private:
        return withheld(_evaluate, rows, request)
    return _evaluate(rows, request)


def _evaluate(rows: SiteRows, request: ModelRequest) -> tuple[Metrics, dict[str, str]]:
    from client.local_model import fit_predict_local
    from shared.correction import Correction, adapted_logit
    from shared.metrics import binary_metrics, paired_auc_difference, reliability, sigmoid
    from shared.protocol import PAIRS
    from shared.source_model import predict_logit

    model, x = _source(rows, request.source)
    offset = predict_logit(model, x)
    train, test = rows.split.train, rows.split.test
    y_test = rows.data.label[test]
    features = [*rows.schema.shared_features, *rows.site_feature_defs]
    p_local = fit_predict_local(
        rows.data.features.iloc[train], rows.data.label[train], rows.data.features.iloc[test],
        features, folds=request.cv_folds, seed=rows.seed,
    )
    fallback = 0.0
    try:
        digest = model_digest(_model_document(rows, request))
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
        diff, low, high = paired_auc_difference(y_test, risks[a], risks[b], seed=rows.seed)
        metrics.update({f"diff.{a}-{b}.auc": diff, f"diff.{a}-{b}.auc_lo": low,
                        f"diff.{a}-{b}.auc_hi": high})
    texts = _model_texts(correction, status)
    keep_evaluation(rows, request, metrics, texts)
    return metrics, texts


def keep_evaluation(rows: SiteRows, request: ModelRequest, metrics: Metrics,
                    texts: dict[str, str]) -> Path:
    """Keep a run's held-out results in the site's folder (0600), for the site's own eyes."""
    from client.results import FOLDER
    from shared.files import ensure_private_dir, write_atomically

    folder = ensure_private_dir(rows.site.site_dir / FOLDER)
    path = folder / f"run-{request.run_id}-repeat-{request.repeat + 1}.json"
    document = {"run": request.run_id, "repeat": request.repeat, "site": rows.site.name,
                "metrics": {k: _plain(v) for k, v in metrics.items()}, **texts}
    write_atomically(path, json.dumps(document, indent=1, allow_nan=False).encode("utf-8"),
                     mode=0o600)
    return path


def _plain(value: Any) -> Any:
    """A metric as JSON holds it: NaN (undefined) becomes null."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
