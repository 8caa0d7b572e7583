"""What a coordinator may ask of a site: one typed request per message, parsed once, checked.

Every value in a message's config is one of three things here:

- **site-owned, ignored at a deployed site**: which rows are held out (``split-seed``,
  ``test-fraction``, ``protocol``, ``repeat``) and the seeds of the site's own
  cross-validation and bootstrap. A deployed site splits with its own secret
  (``client.split.keyed_split``) and its own held-out share; a simulated site, whose every
  site the researcher owns, follows the run's settings so that published figures reproduce;
- **bounded**: the preprocessing and weights are checked here (finite, of the model's
  shapes, weights at most :data:`MAX_WEIGHT`), and every model input is then clipped into
  the site's ``input-bound`` (``client.jobs``), so no value the coordinator sends can make
  one row move an answer further than the site's bounds allow, or make a number overflow;
- **refused**: anything else out of range, of the wrong type, or unknown to this site
  (``ContractError``, sent back as an error naming the setting).

The handlers read only these objects, never the raw config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from client.site import SiteSettings
from shared import protocol, secagg
from shared.groups import GROUP, GROUPS, MAX_PRIOR, SOURCE_ARRAYS, Extension, group_name
from shared.preprocessing import TabularPreprocessor
from shared.schema import BUILTINS, Feature, Schema, load_schema
from shared.settings import MODELS, PROTOCOLS, SettingsError

# Largest absolute weight a site computes with: far above any model fitted on standardised
# inputs, and small enough that a logit over bounded inputs never overflows.
MAX_WEIGHT = 1e6
MAX_HIDDEN_UNITS = 1024
MAX_EPOCHS = 1000
MAX_ROUNDS = 100_000


class ContractError(SettingsError):
    """A message asks for something this site does not do; the message names each setting."""


@dataclass(frozen=True)
class SplitPlan:
    """How the site splits its rows for this message.

    Attributes
    ----------
    keyed : bool
        True at a deployed site: rows held out by the site's secret key.
    protocol : str
        Which rows take part (``default`` or ``flamby``).
    test_fraction : float
        The held-out share.
    seed : int or None
        A simulated site's split seed (the run's); None at a deployed site, whose seeds are
        derived from its secret key and the data's version.
    """

    keyed: bool
    protocol: str
    test_fraction: float
    seed: int | None


@dataclass(frozen=True)
class Request:
    """What every message asks: the schema, and the split the site answers on."""

    phase: str
    schema: Schema
    split: SplitPlan
    repeat: int
    run_id: int


@dataclass(frozen=True)
class SourceModel:
    """The source model a message sends: kind, size, preprocessing and weights, all checked."""

    kind: str
    hidden_units: int
    preprocessing: dict[str, Any]
    arrays: ArrayRecord
    input_bound: float

    def preprocessor(self, schema: Schema) -> TabularPreprocessor:
        """The shared preprocessing, rebuilt."""
        return TabularPreprocessor.from_dict(self.preprocessing, list(schema.shared_features))

    def inputs(self, schema: Schema, shared: Any) -> np.ndarray:
        """The model's inputs for rows of shared features, clipped into the site's bound."""
        x = self.preprocessor(schema).transform(shared)
        return np.clip(x, -self.input_bound, self.input_bound)


@dataclass(frozen=True)
class DPRequest:
    """What a train message asks of a site's differential privacy.

    Attributes
    ----------
    mode : {"record", "client"}
        Record-level (the site adds the noise) or client-level (the site clips its update).
    epsilon, delta : float
        The (epsilon, delta) one run may spend at this site.
    clip : float
        The L2 bound of one patient's gradient (record) or of the site's update (client).
    rounds : int
        Planned training rounds of the whole run (``num-server-rounds`` x ``repeats``).
    """

    mode: str
    epsilon: float
    delta: float
    clip: float
    rounds: int


@dataclass(frozen=True)
class GroupRound:
    """A group extension's Newton round (``shared.groups``): its features and weights, checked.

    Attributes
    ----------
    features : tuple of Feature
        The group's features, all measured by this site.
    preprocessing : dict
        Their preprocessing (from the group's merged stats), checked like the shared one's.
    arrays : ArrayRecord
        The extension's weights: ``net.weight`` over the source model's inputs then the
        group's, ``net.bias``.
    """

    features: tuple[Feature, ...]
    preprocessing: dict[str, Any]
    arrays: ArrayRecord

    @property
    def name(self) -> str:
        """The group's name."""
        return group_name([f.name for f in self.features])


@dataclass(frozen=True)
class TrainRequest(Request):
    """One training round (of the source model, or of a group extension when ``group``)."""

    source: SourceModel
    newton: bool
    local_epochs: int
    learning_rate: float
    batch_size: int
    weight_decay: float
    proximal_mu: float
    round: int | None
    dp: DPRequest | None
    group: GroupRound | None = None

    @property
    def round_key(self) -> str:
        """The round's name in the ledger: repeat and absolute round (and group)."""
        key = f"{self.repeat}/{self.round or 0}"
        return key if self.group is None else f"{key}/group {self.group.name}"


@dataclass(frozen=True)
class ModelRequest(Request):
    """The adapt or evaluate phase: the final source model, CV folds, the site's groups.

    The extensions are those of the feature groups this site belongs to (``shared.groups``).
    """

    source: SourceModel
    cv_folds: int
    extensions: tuple[Extension, ...] = ()


class _Reader:
    """Typed reads of one config record; every problem is collected, then raised at once."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.problems: list[str] = []

    def get(self, key: str, kind: type, default: Any = None, *, low: float = -math.inf,
            high: float = math.inf, choices: tuple[str, ...] = ()) -> Any:
        value = self.config.get(key, default)
        if value is None:
            self.problems.append(f"{key} is missing")
            return default
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            self.problems.append(f"{key} must be {kind.__name__}")
            return default
        if kind in (int, float) and not (math.isfinite(value) and low <= value <= high):
            self.problems.append(f"{key} = {value!r} is outside [{low:g}, {high:g}]")
            return default
        if choices and value not in choices:
            self.problems.append(f"{key} = {value!r} is not one of {', '.join(choices)}")
            return default
        return kind(value)

    def done(self, what: str) -> None:
        if self.problems:
            raise ContractError(f"the {what} message is refused: " + "; ".join(self.problems))


def parse(phase: str, msg: Message, site: SiteSettings, input_bound: float) -> Request:
    """Parse one message into the typed request its phase handler reads.

    Parameters
    ----------
    phase : {"stats", "train", "adapt", "evaluate"}
        The phase the message's type names.
    msg : Message
        The coordinator's message.
    site : SiteSettings
        The site (a deployed site owns its split).
    input_bound : float
        The site's bound on every model input (its policy's ``input-bound``).

    Returns
    -------
    Request
        ``Request`` (stats), ``TrainRequest`` or ``ModelRequest``.

    Raises
    ------
    ContractError
        Naming every setting that is missing, of the wrong type, or out of range.
    client.site.SchemaMismatch
        If the run's schema is not one the site uses.
    """
    config = msg.content.config_records.get(protocol.CONFIG) if msg.has_content() else None
    read = _Reader(config if config is not None else {})
    schema = _schema(read, site)
    split = _split(read, site)
    repeat = read.get("repeat", int, 0, low=0, high=MAX_ROUNDS)
    common: dict[str, Any] = {"phase": phase, "schema": schema, "split": split,
                              "repeat": repeat if site.simulated else 0,
                              "run_id": int(msg.metadata.run_id)}
    if phase == "stats":
        read.done(phase)
        return Request(**common)
    grouped = phase == "train" and config is not None and GROUP in config
    source = _source(read, msg, schema, input_bound, SOURCE_ARRAYS if grouped else protocol.ARRAYS)
    if phase in ("adapt", "evaluate"):
        folds = read.get("cv-folds", int, 5, low=2, high=20)
        extensions = _extensions(read, schema, site, source)
        read.done(phase)
        return ModelRequest(**common, source=source, cv_folds=folds, extensions=extensions)
    if phase != "train":
        raise ContractError(f"no message of phase {phase!r} is answered")
    newton = read.get(protocol.STRATEGY, str, "fedavg") == "newton"
    group = _group_round(read, msg, schema, site, source) if grouped else None
    if group is not None and not newton:
        read.problems.append("a group extension is trained by Newton rounds only")
    if newton and source.kind != "logreg" and group is None:
        read.problems.append("a Newton round needs the logistic model (model = logreg)")
    request = TrainRequest(
        **common, source=source, newton=newton,
        local_epochs=read.get("local-epochs", int, 1, low=1, high=MAX_EPOCHS),
        learning_rate=read.get("learning-rate", float, 0.5, low=1e-12, high=100.0),
        batch_size=read.get("batch-size", int, 0, low=0, high=2**31),
        weight_decay=read.get("weight-decay", float, 0.0, low=0.0, high=1e3),
        proximal_mu=read.get("proximal-mu", float, 0.0, low=0.0, high=1e3),
        round=protocol.absolute_round(config),
        dp=_dp(read, site),
        group=group,
    )
    read.done(phase)
    return request


def _site_defs(read: _Reader, schema: Schema, site: SiteSettings, names: Any,
               what: str) -> tuple[Feature, ...] | None:
    """A group's features: names of site-only features this site measures, or a problem."""
    if (not isinstance(names, list) or not names or len(names) > 64
            or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
        read.problems.append(f"{what}: features must be a list of distinct names")
        return None
    unknown = [n for n in names if n not in site.site_features]
    if unknown:
        # Only names the site itself declared are ever repeated back.
        read.problems.append(f"{what}: the group names {len(unknown)} feature(s) this site "
                             "does not measure")
        return None
    return tuple(schema.resolve_site_features(list(names)))


def _source_inputs(source: SourceModel, schema: Schema) -> int:
    """How many inputs the source model has (0 when its preprocessing was refused)."""
    try:
        return len(source.preprocessor(schema).feature_names_out_)
    except (ValueError, TypeError, KeyError):
        return 0


def _group_round(read: _Reader, msg: Message, schema: Schema, site: SiteSettings,
                 source: SourceModel) -> GroupRound | None:
    """A group round's features, preprocessing and extension weights, all checked."""
    try:
        state = json.loads(read.get(GROUP, str, "{}"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        defs = _site_defs(read, schema, site, state.get("features"), "group")
        if defs is None:
            return None
        names_out = _check_preprocessing(state.get("preprocessing"), defs)
    except (ValueError, TypeError, KeyError) as err:
        read.problems.append(f"group is not usable ({err})")
        return None
    arrays = msg.content.array_records.get(protocol.ARRAYS) if msg.has_content() else None
    d = _source_inputs(source, schema)
    if arrays is None:
        read.problems.append("the group round carries no extension weights")
        return None
    if d:
        read.problems += _check_arrays(arrays, {"net.weight": (1, d + len(names_out)),
                                                "net.bias": (1,)})
    return GroupRound(defs, state["preprocessing"], arrays)


def _extensions(read: _Reader, schema: Schema, site: SiteSettings,
                source: SourceModel) -> tuple[Extension, ...]:
    """The adapt message's group extensions this site belongs to, checked; others ignored.

    An extension of features this site does not measure is none of its business and is
    skipped (the message goes to every site alike).
    """
    raw = read.config.get(GROUPS)
    if raw is None:
        return ()
    d = _source_inputs(source, schema)
    out = []
    try:
        states = json.loads(raw) if isinstance(raw, str) else None
        if not isinstance(states, list) or len(states) > 64:
            raise ValueError("not a list of at most 64 groups")
        for state in states:
            if not isinstance(state, dict):
                raise ValueError("a group is not a JSON object")
            names = state.get("features")
            if not isinstance(names, list) or not set(map(str, names)) <= set(site.site_features):
                continue
            defs = _site_defs(read, schema, site, names, "groups")
            if defs is None:
                continue
            names_out = _check_preprocessing(state.get("preprocessing"), defs)
            ext = Extension.from_dict(state)
            if ext.theta.shape != (d + len(names_out) + 1,) or not d:
                raise ValueError(f"group {ext.name}: {d + len(names_out) + 1} weights needed")
            if not np.isfinite(ext.theta).all() or np.abs(ext.theta).max() > MAX_WEIGHT:
                raise ValueError(f"group {ext.name}: weights must be finite and at most "
                                 f"{MAX_WEIGHT:g} in size")
            if (ext.prior_gain is None) != (ext.prior_sd is None) or (
                    ext.prior_gain is not None and ext.prior_sd is not None and not (
                        abs(ext.prior_gain) <= MAX_PRIOR and 0 < ext.prior_sd <= MAX_PRIOR)):
                raise ValueError(f"group {ext.name}: prior_gain must be within "
                                 f"{MAX_PRIOR:g} and prior_sd in (0, {MAX_PRIOR:g}], or both "
                                 "null")
            out.append(ext)
    except (ValueError, TypeError, KeyError) as err:
        read.problems.append(f"groups are not usable ({err})")
        return ()
    return tuple(out)


def _schema(read: _Reader, site: SiteSettings) -> Schema:
    """The schema the site answers in: its own, or a built-in one the run names.

    A deployed site never opens a file the coordinator names; a run's schema must be a
    built-in one or the one the site itself names (``schema`` in its node config).
    """
    from client.site import SchemaMismatch

    named = read.get("schema", str, "")
    digest = read.get("schema-digest", str, "")
    if site.schema:
        schema = load_schema(site.schema)
    elif site.simulated or named in BUILTINS:
        schema = load_schema(named)
    else:
        raise SchemaMismatch(
            "the run names a schema file; a deployed site uses a built-in schema or the "
            "one its own node config names (schema=\"...\"): add it there")
    if schema.digest() != digest:
        raise SchemaMismatch(
            f"the site's schema {schema.name!r} (version {schema.version}) differs from the "
            "server's: use the same schema file on both sides")
    return schema


def _split(read: _Reader, site: SiteSettings) -> SplitPlan:
    """The split: the run's at a simulated site, the site's own (keyed) at a deployed one."""
    if site.deployed:
        return SplitPlan(keyed=True, protocol=site.protocol,
                         test_fraction=site.test_fraction, seed=None)
    return SplitPlan(
        keyed=False,
        protocol=read.get("protocol", str, "default", choices=PROTOCOLS),
        test_fraction=read.get("test-fraction", float, 0.3, low=0.01, high=0.99),
        seed=read.get("split-seed", int, 0, low=0, high=2**32 - 1),
    )


def _source(read: _Reader, msg: Message, schema: Schema, input_bound: float,
            key: str = protocol.ARRAYS) -> SourceModel:
    """The model a message sends, checked: kind, size, preprocessing, finite bounded weights.

    ``key`` names its arrays' record (``source`` in a group round, whose ``arrays`` are the
    extension's).
    """
    kind = read.get("model", str, "logreg", choices=MODELS)
    hidden = read.get("hidden-units", int, 16, low=1, high=MAX_HIDDEN_UNITS)
    prep_state: dict[str, Any] = {}
    names_out: list[str] = []
    try:
        prep_state = json.loads(read.get("preprocessing", str, "{}"))
        names_out = _check_preprocessing(prep_state, schema.shared_features)
    except (ValueError, TypeError, KeyError) as err:
        read.problems.append(f"preprocessing is not usable ({err})")
    arrays = (msg.content.array_records.get(key) if msg.has_content() else None)
    if arrays is None:
        read.problems.append("the message carries no model weights")
        arrays = ArrayRecord()
    elif names_out:
        read.problems += _check_arrays(arrays, _shapes(kind, len(names_out), hidden))
    return SourceModel(kind, hidden, prep_state, arrays, input_bound)


def _check_preprocessing(state: Any, features: Sequence[Feature]) -> list[str]:
    """The preprocessing's output names, after checking that every number is usable.

    ``features`` are those it must have been fitted on: the schema's shared features, or a
    feature group's.

    Raises
    ------
    ValueError
        Naming the first problem.
    """
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    prep = TabularPreprocessor.from_dict(state, list(features))
    numeric = [f for f in features if f.kind != "categorical"]
    if prep.mean_.shape != (len(numeric),) or prep.scale_.shape != (len(numeric),):
        raise ValueError(f"mean and scale need {len(numeric)} values each")
    if not (np.isfinite(prep.mean_).all() and np.isfinite(prep.scale_).all()
            and (prep.scale_ > 0).all()):
        raise ValueError("means must be finite and scales finite and positive")
    if not set(prep.indicator_features_) <= {f.name for f in features}:
        raise ValueError("indicators of unknown features")
    return list(prep.feature_names_out_)


def _shapes(kind: str, n_inputs: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the source model's weights (``shared.source_model``)."""
    if kind == "logreg":
        return {"net.weight": (1, n_inputs), "net.bias": (1,)}
    return {"net.0.weight": (hidden, n_inputs), "net.0.bias": (hidden,),
            "net.2.weight": (1, hidden), "net.2.bias": (1,)}


def _check_arrays(arrays: ArrayRecord, want: dict[str, tuple[int, ...]]) -> list[str]:
    got = {k: tuple(arrays[k].shape) for k in arrays}
    if got != want:
        return [f"the weights {got} are not the source model's {want}"]
    for name in arrays:
        values = arrays[name].numpy()
        if not np.issubdtype(values.dtype, np.floating):
            return [f"weights {name!r} are not floating-point numbers"]
        if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > MAX_WEIGHT:
            return [f"weights {name!r} must be finite and at most {MAX_WEIGHT:g} in size"]
    return []


def _planned_groups(read: _Reader, site: SiteSettings) -> int:
    """How many of the run's feature groups (``group-plan``) this site measures."""
    try:
        plan = json.loads(read.get("group-plan", str, "[]"))
    except ValueError:
        plan = None
    if not isinstance(plan, list) or not all(
            isinstance(g, list) and all(isinstance(f, str) for f in g) for g in plan):
        read.problems.append("group-plan must be a JSON list of lists of feature names")
        return 0
    return sum(bool(g) and set(g) <= set(site.site_features) for g in plan)


def _dp(read: _Reader, site: SiteSettings) -> DPRequest | None:
    """The train message's DP request; None when it asks for none.

    The run's planned rounds at this site: the source model's, and ``group-rounds`` for each
    group of ``group-plan`` the site belongs to, every repeat.
    """
    mode = read.get("dp", str, "off", choices=("off", "record", "client"))
    if mode == "off":
        return None
    per_repeat = read.get("num-server-rounds", int, 1, low=1, high=MAX_ROUNDS) + (
        read.get("group-rounds", int, 0, low=0, high=MAX_ROUNDS)
        * _planned_groups(read, site))
    rounds = per_repeat * read.get("repeats", int, 1, low=1, high=MAX_ROUNDS)
    clip = read.get("dp-clip", float, 1.0, low=1e-6, high=1e3)
    flower_clip = read.config.get("clipping_norm")  # Flower's client-side wrapper sends it
    if flower_clip is not None and flower_clip != clip:
        read.problems.append("clipping_norm differs from dp-clip")
    return DPRequest(mode=mode,
                     # Any finite epsilon: the site's policy caps what it accepts.
                     epsilon=read.get("dp-epsilon", float, 1.0, low=1e-6),
                     delta=read.get("dp-delta", float, 1e-5, low=1e-300, high=0.5),
                     clip=clip, rounds=min(rounds, MAX_ROUNDS))


# A secure sum's stages (client.secure_reply): most neighbours, longest key or share.
MAX_NEIGHBOURS = 4096
MAX_BYTES = 4096


@dataclass(frozen=True)
class Stage:
    """One stage's request, every value checked.

    Attributes
    ----------
    name : str
        ``keys``, ``share``, ``masked`` or ``unmask``.
    sum_id : str
        The secure sum it belongs to (``keys``: the batch of key pairs it makes).
    count : int
        ``keys``: how many key pairs to make, one for each sum to come.
    batch, index : str, int
        ``share``: the batch and the pair of it this sum uses (each pair once).
    public : dict
        ``share``: each neighbour's (and the site's own) two public keys.
    threshold : int
        ``share``: shares that rebuild a secret.
    incoming : dict
        ``masked``: the neighbours' encrypted shares for this site.
    inner : str
        ``masked``: the summed message's type (``stats`` or ``train``).
    clip : float
        ``masked``: the quantisation range.
    active, dead : list of int
        ``unmask``: the sites the coordinator says survived, and were lost.
    """

    name: str
    sum_id: str
    count: int
    batch: str
    index: int
    public: dict[int, tuple[bytes, bytes]]
    threshold: int
    incoming: dict[int, bytes]
    inner: str
    clip: float
    active: list[int]
    dead: list[int]


def parse_stage(msg: Message) -> Stage:
    """Read a secure sum's stage from ``msg``.

    Raises
    ------
    client.contract.ContractError
        For a missing or malformed value.
    """
    record = msg.content.config_records.get(protocol.SECAGG_RECORD)
    if record is None:
        raise ContractError("a secure-aggregation message without its 'secagg' record")
    name = record.get(protocol.STAGE)
    sum_id = record.get(protocol.SUM_ID)
    if name not in protocol.SECAGG_STAGES or not isinstance(sum_id, str) or not sum_id:
        raise ContractError("a secure-aggregation message names no known stage or sum")
    public: dict[int, tuple[bytes, bytes]] = {}
    incoming: dict[int, bytes] = {}
    threshold, inner, clip, count, batch, index = 0, "", 0.0, 0, "", 0
    active: list[int] = []
    dead: list[int] = []
    if name == "keys":
        count = _count(record, "count", 1, secagg.MAX_KEY_PAIRS)
    elif name == "share":
        batch = str(record.get("batch", ""))
        index = _count(record, "index", 0, secagg.MAX_KEY_PAIRS - 1)
        nodes = _ints(record, "nodes")
        pk1, pk2 = _blobs(record, "pk1", len(nodes)), _blobs(record, "pk2", len(nodes))
        public = {n: (a, b) for n, a, b in zip(nodes, pk1, pk2, strict=True)}
        asked = record.get("threshold")
        if not isinstance(asked, int) or isinstance(asked, bool):
            raise ContractError("the share stage's threshold is not an integer")
        threshold = asked
    elif name == "masked":
        sources = _ints(record, "from")
        incoming = dict(zip(sources, _blobs(record, "boxes", len(sources)), strict=True))
        inner = str(record.get(protocol.INNER, ""))
        asked_clip = record.get(protocol.CLIP)
        if inner not in ("stats", "train"):
            raise ContractError("the masked stage sums a stats or a train message only")
        if not isinstance(asked_clip, float) or not 0.0 < asked_clip <= 1e15:
            raise ContractError("the masked stage's clip is not a number in (0, 1e15]")
        clip = asked_clip
    elif name == "unmask":
        active, dead = _ints(record, "active"), _ints(record, "dead")
    return Stage(name, sum_id, count, batch, index, public, threshold, incoming, inner, clip,
                 active, dead)


def _count(record: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ContractError(f"the secure sum's {key!r} is not a whole number in [{low}, {high}]")
    return value


def _ints(record: Mapping[str, Any], key: str) -> list[int]:
    values = record.get(key, [])
    if not isinstance(values, list) or len(values) > MAX_NEIGHBOURS or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ContractError(f"the secure sum's {key!r} is not a list of node ids")
    if len(set(values)) != len(values):
        raise ContractError(f"the secure sum's {key!r} names a node twice")
    return list(values)


def _blobs(record: Mapping[str, Any], key: str, length: int) -> list[bytes]:
    values = record.get(key, [])
    if not isinstance(values, list) or len(values) != length or not all(
            isinstance(v, bytes) and len(v) <= MAX_BYTES for v in values):
        raise ContractError(f"the secure sum's {key!r} is not {length} short byte strings")
    return list(values)
