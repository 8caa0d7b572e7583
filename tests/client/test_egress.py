"""Proof that a site's replies carry only the source model's arrays and aggregate numbers."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import client_app as client_module
from client.client_app import app as client_app
from client.contract import ContractError
from client.correction_store import load_correction
from client.data import DataError, Problem
from client.egress import EgressViolation, build_reply, error_reply
from client.policy import PolicyRefusal
from client.site import SchemaMismatch, SiteSettings
from client.source_model_store import list_models, load_source_model
from shared import newton, protocol
from shared.errors import FedadaptError
from shared.groups import GROUP, GROUPS, SOURCE_ARRAYS, Extension, extensions_json
from shared.preprocessing import TabularPreprocessor, merge_summaries, summary_keys
from shared.schema import SchemaError, load_schema
from shared.source_model import build_model, to_arrays
from simulations.generator import generate

# Patient values planted in the site's file; none may leave the site in any form.
CANARY_WEIGHT = 173.71
CANARY_GLUCOSE = 313.37
CANARY_TEXT = "CANARY-9931"
SCHEMA = load_schema("synthetic")


def _site_file(tmp_path: Path) -> Path:
    """A generated hospital with ten planted canary patients (in train and held-out rows)."""
    manifest = generate(tmp_path / "data", n_sites=1, seed=5)
    path = manifest.parent / "hospital-a.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    for i in range(10):
        row = dict.fromkeys(header, "")
        row.update({"age": str(40 + i), "weight": str(CANARY_WEIGHT), "height": "171",
                    "systolic_bp": "133", "glucose": str(CANARY_GLUCOSE),
                    "diabetes": str(i % 2)})
        lines.insert(5 + 7 * i, ",".join(row[c] for c in header))
    path.write_text("\n".join(lines) + "\n")
    return path


def _context(data_file: Path, site_dir: Path) -> Context:
    node_config: dict[str, Any] = {
        "data-file": str(data_file), "site-dir": str(site_dir), "site-name": "canary-site",
        "site-features": "glucose", "simulated": True,
    }
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def _base() -> dict[str, Any]:
    return {
        "schema": "synthetic", "schema-digest": SCHEMA.digest(), "protocol": "default",
        "split-seed": 42, "test-fraction": 0.3, "model": "logreg", "hidden-units": 16,
        "cv-folds": 5, "repeat": 0,
    }


def _send(mtype: str, content: RecordDict, ctx: Context) -> Message:
    return client_app(Message(content=content, dst_node_id=1, message_type=mtype), ctx)


def _wire_bytes(obj: Any) -> bytes:
    """Every byte of a reply as Flower serialises it (the object and all its children)."""
    return obj.deflate() + b"".join(_wire_bytes(c) for c in obj.children.values()) if (
        obj.children
    ) else obj.deflate()


def _numbers(reply: Message) -> list[float]:
    out: list[float] = []
    for metric_record in reply.content.metric_records.values():
        for value in metric_record.values():
            out += [float(v) for v in (value if isinstance(value, list) else [value])]
    for array_record in reply.content.array_records.values():
        for name in array_record:
            out += [float(v) for v in array_record[name].numpy().ravel()]
    return out


def _assert_no_canary(reply: Message, extra: list[float] = ()) -> None:  # type: ignore[assignment]
    wire = _wire_bytes(reply)
    for value in (CANARY_WEIGHT, CANARY_GLUCOSE, *extra):
        assert struct.pack("<d", value) not in wire and struct.pack(">d", value) not in wire
        assert struct.pack("<f", value) not in wire
        assert str(value).encode() not in wire
        assert not np.isclose(_numbers(reply), value, rtol=0, atol=1e-9).any()
    assert CANARY_TEXT.encode() not in wire


def _run_phases(tmp_path: Path) -> tuple[dict[str, Message], Path]:
    """Drive the site's ClientApp through every phase, as the ServerApp does."""
    site_dir = tmp_path / "site"
    ctx = _context(_site_file(tmp_path), site_dir)
    base = _base()
    stats = RecordDict({protocol.CONFIG: ConfigRecord(base)})
    replies = {"stats": _send(protocol.STATS, stats, ctx)}
    metrics = replies["stats"].content.metric_records[protocol.METRICS]
    summary = {k: [float(v) for v in _as_list(metrics[k])]
               for k in summary_keys(SCHEMA.shared_features)}
    prep = TabularPreprocessor(features=list(SCHEMA.shared_features)).fit_summary(
        merge_summaries([summary]))
    model = build_model("logreg", len(prep.feature_names_out_))
    config = {**base, "preprocessing": json.dumps(prep.to_dict()), "local-epochs": 2,
              "learning-rate": 0.5, "batch-size": 0, "weight-decay": 0.001, "server-round": 1}
    replies["train"] = _send(protocol.TRAIN, RecordDict({
        protocol.ARRAYS: to_arrays(model), protocol.CONFIG: ConfigRecord(config)}), ctx)
    replies["newton"] = _send(protocol.TRAIN, RecordDict({
        protocol.ARRAYS: to_arrays(model),
        protocol.CONFIG: ConfigRecord({**config, protocol.STRATEGY: "newton"})}), ctx)
    final = replies["train"].content.array_records[protocol.ARRAYS]
    # A feature group's round: the extension's weights, the frozen source model beside them.
    glucose = SCHEMA.resolve_site_features(["glucose"])
    group_prep = TabularPreprocessor(features=list(glucose)).fit_summary(merge_summaries([{
        k: [float(v) for v in _as_list(metrics[k])] for k in summary_keys(glucose)}]))
    d = len(prep.feature_names_out_) + len(group_prep.feature_names_out_) + 1
    group_config = {**config, protocol.STRATEGY: "newton", GROUP: json.dumps(
        {"features": ["glucose"], "preprocessing": group_prep.to_dict()})}
    replies["group"] = _send(protocol.TRAIN, RecordDict({
        protocol.ARRAYS: newton.to_arrays(np.zeros(d)), SOURCE_ARRAYS: final,
        protocol.CONFIG: ConfigRecord(group_config)}), ctx)
    extension = Extension(("glucose",), group_prep.to_dict(), np.full(d, 0.1), 2, 100, 0.05,
                          0.02)
    config = {**config, GROUPS: extensions_json([extension])}
    content = RecordDict({protocol.ARRAYS: final, protocol.CONFIG: ConfigRecord(config)})
    replies["adapt"] = _send(protocol.ADAPT, content, ctx)
    replies["evaluate"] = _send(protocol.EVALUATE, content, ctx)
    return replies, site_dir


def test_replies_hold_only_model_arrays_and_aggregates(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every phase's reply: allowed keys only, the model's arrays only, no planted value."""
    caplog.set_level(logging.DEBUG)
    replies, site_dir = _run_phases(tmp_path)
    allowed = {
        # The site's own features' sums too: a feature group's preprocessing is fitted on them.
        "stats": set(summary_keys([*SCHEMA.shared_features,
                                   *SCHEMA.resolve_site_features(["glucose"])]))
        | set(protocol.STATS_EXTRA),
        "train": set(protocol.TRAIN_METRICS),
        "newton": set(protocol.NEWTON_METRICS),
        "group": set(protocol.NEWTON_METRICS),
        "adapt": set(protocol.ADAPT_METRICS),
        "evaluate": set(protocol.EVALUATE_METRICS),
    }
    shapes = {"train": {"net.weight": (1, 7), "net.bias": (1,)},
              # 8 parameters: the gradient sum and the Hessian sum's upper triangle.
              "newton": {newton.GRAD: (8,), newton.HESS: (36,)},
              # 10: the source model's 7 inputs, glucose and its missing indicator, the bias.
              "group": {newton.GRAD: (10,), newton.HESS: (55,)}}
    for phase, reply in replies.items():
        assert not reply.has_error(), (phase, reply.error.reason if reply.has_error() else "")
        content = reply.content
        assert set(content.metric_records) == {protocol.METRICS}
        assert set(content[protocol.METRICS]) <= allowed[phase]
        if phase in shapes:
            arrays = content.array_records[protocol.ARRAYS]
            assert set(content.array_records) == {protocol.ARRAYS}
            assert {k: tuple(arrays[k].shape) for k in arrays} == shapes[phase]
        else:
            assert not content.array_records
        for record in content.config_records.values():
            assert set(record) <= {protocol.SITE_NAME, protocol.SCHEMA_DIGEST,
                                   protocol.CORRECTION_STATUS, protocol.SITE_FEATURES,
                                   protocol.MODEL_CHOICE, protocol.MODEL_REASON}
        _assert_no_canary(reply)

    # The correction stays at the site: none of its weights is in any reply.
    (model,) = list_models(site_dir)
    correction = load_correction(site_dir, "canary-site", load_source_model(site_dir).digest)
    assert model == load_source_model(site_dir).path
    assert correction["applied"], "the planted glucose effect should be worth a correction"
    weights = [c for c in correction["coef"] if abs(c) > 1e-6] + [correction["intercept"]]
    for reply in replies.values():
        _assert_no_canary(reply, extra=weights)

    printed = capsys.readouterr()
    for text in (str(CANARY_WEIGHT), str(CANARY_GLUCOSE), CANARY_TEXT):
        assert text not in caplog.text
        assert text not in printed.out + printed.err


def test_a_bad_cell_gives_an_error_reply_without_its_value(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed cell is reported by file, line and column, never by its content."""
    caplog.set_level(logging.DEBUG)
    path = _site_file(tmp_path)
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[1] = CANARY_TEXT  # the weight of the patient on line 4
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    reply = _send(protocol.STATS, RecordDict({protocol.CONFIG: ConfigRecord(_base())}),
                  _context(path, tmp_path / "site"))
    assert reply.has_error()
    reason = str(reply.error.reason)
    assert "<data-file>:4:2 (column 'weight')" in reason
    assert str(path) not in reason and str(tmp_path) not in reason  # nothing local leaves
    assert CANARY_TEXT not in reason and CANARY_TEXT not in caplog.text


@pytest.mark.parametrize("damage", ["header merged with the first row",
                                    "header cells shifted by one"])
def test_a_damaged_header_gives_an_error_reply_without_any_cell(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], damage: str,
) -> None:
    """A header glued to a patient row, or shifted, is located; no cell of it is sent."""
    caplog.set_level(logging.DEBUG)
    path = _site_file(tmp_path)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    first = dict.fromkeys(header, "")
    first.update({"age": "61", "weight": str(CANARY_WEIGHT), "height": CANARY_TEXT,
                  "systolic_bp": "133", "glucose": str(CANARY_GLUCOSE), "diabetes": "1"})
    row = ",".join(first[c] for c in header)
    if damage == "header merged with the first row":
        lines[0] = lines[0] + row
    else:
        lines[0] = ",".join([CANARY_TEXT, *header])
        lines.insert(1, row)
    path.write_text("\n".join(lines) + "\n")
    reply = _send(protocol.STATS, RecordDict({protocol.CONFIG: ConfigRecord(_base())}),
                  _context(path, tmp_path / "site"))
    assert reply.has_error()
    reason = str(reply.error.reason)
    assert "<data-file>:1:" in reason and str(path) not in reason
    wire = reason.encode()
    for canary in (str(CANARY_WEIGHT), str(CANARY_GLUCOSE), CANARY_TEXT):
        assert canary.encode() not in wire
        assert canary not in caplog.text
    printed = capsys.readouterr()
    assert CANARY_TEXT not in printed.out + printed.err


def test_an_unexpected_failure_is_reported_by_type_only(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception fedadapt did not write (its text may quote data) is sent by type only."""
    caplog.set_level(logging.DEBUG)

    def leaky(*args: object, **kwargs: object) -> None:
        raise ValueError(f"could not convert {CANARY_WEIGHT} at row 12")

    monkeypatch.setattr(client_module, "stats_job", leaky)
    reply = _send(protocol.STATS, RecordDict({protocol.CONFIG: ConfigRecord(_base())}),
                  _context(_site_file(tmp_path), tmp_path / "site"))
    assert reply.has_error()
    assert reply.error.reason == (
        "[site canary-site] ValueError at the site during stats; see the site's log")
    assert str(CANARY_WEIGHT) not in caplog.text


class _NewError(FedadaptError):
    """An error fedadapt may add later: being a FedadaptError is all it takes to be sent."""


@pytest.mark.parametrize(("err", "code", "reason"), [
    (PolicyRefusal("phases", "no evaluate here"), protocol.REFUSED,
     "refused by policy rule 'phases': no evaluate here"),
    (DataError([Problem("/srv/site/data.csv", 4, 2, "weight", "not a number")]),
     protocol.DATA_ERROR, "DataError: <data-file>:4:2 (column 'weight'): not a number"),
    (SchemaMismatch("the site uses schema heart"), protocol.SCHEMA_MISMATCH,
     "SchemaMismatch: the site uses schema heart"),
    (SchemaError("/etc/fedadapt/s.toml:3:1: bad"), protocol.SCHEMA_MISMATCH,
     "SchemaError: <site path>:3:1: bad"),
    (ContractError("dp-epsilon must be positive"), protocol.SITE_ERROR,
     "ContractError: dp-epsilon must be positive"),
    (_NewError("the folder /srv/site/x is full"), protocol.SITE_ERROR,
     "_NewError: the folder <site-dir>/x is full"),
    (ValueError(f"could not convert {CANARY_WEIGHT}"), protocol.SITE_ERROR,
     "ValueError at the site during train; see the site's log"),
])
def test_each_kind_of_error_has_its_code_and_only_fedadapt_s_messages_are_sent(
    err: BaseException, code: int, reason: str, task_identity: None
) -> None:
    """A FedadaptError's message goes out with the site's paths replaced; others by type."""
    site = SiteSettings("north", Path("/srv/site/data.csv"), (), Path("/srv/site"))
    msg = Message(content=RecordDict(), dst_node_id=1, message_type=protocol.TRAIN)
    reply = error_reply(msg, err, "train", site)
    assert reply.error.code == code
    assert reply.error.reason == f"[site north] {reason}"


def _train_message(
    shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None = None
) -> Message:
    arrays = ArrayRecord({k: _array(v) for k, v in shapes.items()})
    return Message(content=RecordDict({protocol.ARRAYS: arrays,
                                       protocol.CONFIG: ConfigRecord(config or {})}),
                   dst_node_id=1, message_type=protocol.TRAIN)


def _array(shape: tuple[int, ...]) -> Any:
    from flwr.app import Array

    return Array(np.zeros(shape))


def test_build_reply_refuses_anything_else(task_identity: None) -> None:
    """Unknown metric keys, foreign arrays, non-numbers and long texts are never sent."""
    shapes = {"net.weight": (1, 3), "net.bias": (1,)}
    msg = _train_message(shapes)
    good = {"num-examples": 10.0, "train-loss": 0.5, "global-loss": 0.6}
    feats = SCHEMA.shared_features
    sound = ArrayRecord({k: _array(v) for k, v in shapes.items()})
    assert not build_reply(msg, shared_features=feats, metrics=good, arrays=sound).has_error()
    with pytest.raises(EgressViolation, match="not allowed"):
        build_reply(msg, shared_features=feats, metrics={**good, "age-of-row-3": 61.0},
                    arrays=sound)
    with pytest.raises(EgressViolation, match="differ"):
        build_reply(msg, shared_features=feats, metrics=good, arrays=ArrayRecord(
            {"net.weight": _array((1, 3)), "net.bias": _array((1,)),
             "correction.coef": _array((5,))}))
    with pytest.raises(EgressViolation, match="not finite"):
        build_reply(msg, shared_features=feats, metrics={**good, "train-loss": float("inf")},
                    arrays=sound)
    with pytest.raises(EgressViolation, match="must carry"):
        build_reply(msg, shared_features=feats, metrics=good)
    stats = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=1,
                    message_type=protocol.STATS)
    with pytest.raises(EgressViolation, match="may not carry arrays"):
        build_reply(stats, shared_features=feats, metrics={"rows": [3.0]}, arrays=sound)
    with pytest.raises(EgressViolation, match="site keys"):
        build_reply(stats, shared_features=feats, metrics={"rows": [3.0]},
                    site={"patient-notes": "x"})
    with pytest.raises(EgressViolation, match="short string"):
        build_reply(stats, shared_features=feats, metrics={"rows": [3.0]},
                    site={protocol.SITE_NAME: "x" * 5000})


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_a_newton_reply_holds_only_the_sums_of_the_model_s_size(task_identity: None) -> None:
    """In a Newton round the sums are the only arrays; model weights or extra keys are refused."""
    shapes = {"net.weight": (1, 3), "net.bias": (1,)}
    msg = _train_message(shapes, {protocol.STRATEGY: "newton"})
    feats = SCHEMA.shared_features
    good = {"num-examples": 10.0, "loss-sum": 6.9}
    sums = ArrayRecord({newton.GRAD: _array((4,)), newton.HESS: _array((10,))})
    reply = build_reply(msg, shared_features=feats, metrics=good, arrays=sums)
    assert set(reply.content.array_records[protocol.ARRAYS]) == {newton.GRAD, newton.HESS}
    with pytest.raises(EgressViolation, match="Newton"):
        build_reply(msg, shared_features=feats, metrics=good, arrays=ArrayRecord(
            {k: _array(v) for k, v in shapes.items()}))
    with pytest.raises(EgressViolation, match="Newton"):  # a full Hessian is not the packed one
        build_reply(msg, shared_features=feats, metrics=good, arrays=ArrayRecord(
            {newton.GRAD: _array((4,)), newton.HESS: _array((4, 4))}))
    with pytest.raises(EgressViolation, match="not allowed"):
        build_reply(msg, shared_features=feats, metrics={**good, "train-loss": 0.5},
                    arrays=sums)
