"""Tests of record-level differential privacy at a site: accountant, clipping, noise, ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client import privacy
from client.contract import ContractError, DPRequest, TrainRequest, parse
from client.data import read_site_data
from client.jobs import SiteRows, newton_job, train_job
from client.ledger import LEDGER
from client.policy import NO_POLICY, PolicyRefusal
from client.site import SiteSettings
from client.split import split_site
from client.train import dp_schedule, train_local_dp
from shared import dp_accounting, newton, protocol
from shared.preprocessing import TabularPreprocessor
from shared.schema import load_schema
from shared.source_model import build_model, to_arrays
from simulations.generator import generate

SCHEMA = load_schema("synthetic")


def test_accountant_matches_the_published_tf_privacy_value() -> None:
    """Opacus' RDP of DP-SGD reproduces TF Privacy's published epsilon 2.92.

    Source: tensorflow/privacy, tutorials/README.md ("Select Parameters", first row): MNIST,
    N = 60,000, batch 256, noise multiplier 1.12, 60 epochs, delta = 1e-5 -> epsilon 2.92.
    TF Privacy converted RDP to (epsilon, delta) with the classic bound
    ``eps = rdp(a) + log(1/delta) / (a - 1)``, reproduced here from Opacus' ``compute_rdp``;
    Opacus' accountant itself uses the tighter conversion of Balle et al. (2020), so it reports
    less for the same mechanism (2.52, pinned below).
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    q, sigma, steps, delta = 256 / 60000, 1.12, 60 * (60000 // 256), 1e-5
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    assert round(classic, 2) == 2.92
    ours = dp_accounting.epsilon_spent([(sigma, q, steps)], delta)
    assert ours < classic
    assert ours == pytest.approx(2.516, abs=0.01)


@pytest.mark.parametrize(("q", "steps"), [(1.0, 30), (1.0, 150), (32 / 400, 5 * 13 * 30)])
def test_noise_calibration_reaches_the_target_epsilon(q: float, steps: int) -> None:
    """The calibrated noise spends the target epsilon over the planned steps, within 0.05."""
    sigma = dp_accounting.noise_multiplier(3.0, 1e-5, q, steps)
    spent = dp_accounting.epsilon_spent([(sigma, q, steps)], 1e-5)
    assert 2.95 <= spent <= 3.0
    # The same spent round by round, as the ledger records it.
    per_round = steps // 30 if steps % 30 == 0 else steps
    rounds = steps // per_round
    assert dp_accounting.epsilon_spent([(sigma, q, per_round)] * rounds, 1e-5) == pytest.approx(
        spent, rel=1e-9)


def _one_step_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  clip: float) -> torch.Tensor:
    """The clipped gradient sum one noiseless full-batch DP-SGD step applied (lr 1)."""
    before = torch.cat([p.detach().ravel().clone() for p in model.parameters()])
    train_local_dp(model, x.numpy(), y.numpy(), epochs=1, lr=1.0, batch_size=0,
                   weight_decay=0.0, proximal_mu=0.0, clip=clip, noise_multiplier=0.0,
                   entropy=1)
    after = torch.cat([p.detach().ravel() for p in model.parameters()])
    return (before - after) * len(y)  # the step divides the sum by the expected batch


def test_dp_sgd_clips_each_record_as_a_hand_computed_reference_does() -> None:
    """Opacus' step equals the clipped sum computed independently (torch.func per row).

    Removing one row changes that sum by at most dp-clip: the bound the noise is for.
    """
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64) * 10  # large gradients: clipping acts
    y = (torch.rand(40) < 0.5).to(torch.float64)
    clip = 0.7
    model = build_model("mlp", 5, 8, seed=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def one(p: dict[str, Any], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)
    reference = (flat * torch.clamp(clip / flat.norm(dim=1), max=1.0)[:, None]).sum(0)
    full = _one_step_sum(model, x, y, clip)
    # Opacus adds 1e-6 to each row's norm before dividing: the same sum to about 1e-6.
    assert float((full - reference).abs().max()) < 1e-5
    for i in (0, 17, 39):
        keep = torch.tensor([j for j in range(40) if j != i])
        less = _one_step_sum(build_model("mlp", 5, 8, seed=1), x[keep], y[keep], clip)
        assert float((full - less).norm()) <= clip + 1e-6
    assert float(flat[0].norm()) > clip  # unclipped, a row's gradient is far larger


def test_newton_sums_bound_each_record() -> None:
    """Removing one row changes the loss, gradient and Hessian sums by at most their bounds."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)) * 3
    y = (rng.random(60) < 0.4).astype(float)
    theta = rng.normal(size=5)
    bounds = (1.0, 0.25, privacy.LOSS_BOUND)
    full = newton.clipped_site_sums(x, y, theta, *bounds)
    for i in range(60):
        less = newton.clipped_site_sums(np.delete(x, i, 0), np.delete(y, i), theta, *bounds)
        assert np.linalg.norm(full.grad - less.grad) <= bounds[0] + 1e-9
        assert np.linalg.norm(full.hess - less.hess) <= bounds[1] + 1e-9
        assert np.linalg.norm(newton.pack(full.hess - less.hess)) <= bounds[1] + 1e-9
        assert 0 <= full.loss - less.loss <= bounds[2] + 1e-9
    # With bounds no row reaches, the sums are the exact ones.
    exact, loose = newton.site_sums(x, y, theta), newton.clipped_site_sums(x, y, theta, 1e9,
                                                                             1e9, 1e9)
    assert np.allclose(exact.grad, loose.grad) and np.allclose(exact.hess, loose.hess)
    assert exact.loss == pytest.approx(loose.loss)


def test_newton_noise_has_the_calibrated_scale() -> None:
    """Noise std per part = noise multiplier x sqrt(3) x the part's bound."""
    sums = newton.Sums(0.0, np.zeros(3), np.zeros((3, 3)), 10)
    rng = np.random.default_rng(1)
    draws = [newton.noised_sums(sums, 2.0, (1.0, 0.25, 5.0), rng) for _ in range(4000)]
    scale = 2.0 * math.sqrt(3)
    assert np.std([d[0] for d in draws]) == pytest.approx(scale * 5.0, rel=0.05)
    assert np.std([d[1] for d in draws]) == pytest.approx(scale * 1.0, rel=0.05)
    assert np.std([d[2] for d in draws]) == pytest.approx(scale * 0.25, rel=0.05)


def test_noisy_newton_direction_is_a_descent_direction_for_an_indefinite_hessian() -> None:
    """With DP the server floors the Hessian's eigenvalues: the step goes downhill."""
    hess = np.array([[1.0, 0.0], [0.0, -0.5]]) * 10
    sums = newton.Sums(1.0, np.array([1.0, 1.0]) * 10, hess, 10)
    theta = np.zeros(2)
    step = newton.newton_direction(sums, theta, 0.0, noisy=True)
    assert float(step @ sums.grad) < 0
    assert np.all(np.isfinite(step))


def _dp(epsilon: float = 3.0, rounds: int = 4) -> DPRequest:
    return DPRequest("record", epsilon, 1e-5, 1.0, rounds)


def _train(rows: SiteRows, arrays: ArrayRecord, config: dict[str, Any], run_id: int = 7
           ) -> TrainRequest:
    """The train message a coordinator sends, as the site parses it."""
    msg = Message(content=RecordDict({protocol.ARRAYS: arrays,
                                      protocol.CONFIG: ConfigRecord(config)}),
                  dst_node_id=1, message_type=protocol.TRAIN)
    msg.metadata.__dict__["_run_id"] = run_id
    request = parse("train", msg, rows.site, 10.0)
    assert isinstance(request, TrainRequest)
    return request


def test_ledger_persists_across_runs_and_refuses_beyond_the_budget(tmp_path: Path) -> None:
    """Two runs spend into one ledger; a round past the total budget is refused, uncharged."""
    dp = _dp(rounds=4)
    plan = privacy.plan_round(dp, 3.0, 1.0, 1)
    for rnd in range(1, 5):
        spend = privacy.charge(tmp_path, "a", 11, f"0/{rnd}", plan, dp, (3.0, "dp-epsilon"),
                               5.0)
    assert spend.epsilon <= 3.0 and spend.epsilon == pytest.approx(3.0, abs=0.05)
    ledger = json.loads((tmp_path / LEDGER).read_text())
    assert ledger["runs"]["11"]["history"] == [[plan.noise_multiplier, 1.0, 4]]
    assert (tmp_path / LEDGER).stat().st_mode & 0o777 == 0o600
    # A fifth round of run 11 would exceed its own budget.
    with pytest.raises(PolicyRefusal) as err:
        privacy.charge(tmp_path, "a", 11, "0/5", plan, dp, (3.0, "dp-epsilon"), 5.0)
    assert err.value.rule == "dp-epsilon"
    # A second run: 3 already spent of a total of 5, so it stops after about 2 of its 3.
    spent = []
    with pytest.raises(PolicyRefusal) as err:
        for rnd in range(1, 5):
            spent.append(privacy.charge(tmp_path, "a", 12, f"0/{rnd}", plan, dp,
                                        (3.0, "dp-epsilon"), 5.0).total)
    assert err.value.rule == "max-epsilon-total"
    assert 1 <= len(spent) < 4 and spent[-1] <= 5.0
    assert "12" in json.loads((tmp_path / LEDGER).read_text())["runs"]
    after = json.loads((tmp_path / LEDGER).read_text())
    assert after["runs"]["12"]["epsilon"] == pytest.approx(spent[-1] - 3.0, abs=0.05)
    assert after["total-epsilon"] == pytest.approx(spent[-1])


def test_unreadable_ledger_stops_dp_training(tmp_path: Path) -> None:
    """A damaged ledger is never taken for an empty one."""
    (tmp_path / LEDGER).write_text("{not json")
    dp = _dp()
    with pytest.raises(PolicyRefusal, match="ledger is unreadable"):
        privacy.charge(tmp_path, "a", 1, "0/1", privacy.plan_round(dp, 3.0, 1.0, 1), dp,
                       (3.0, "dp-epsilon"), math.inf)


@pytest.fixture(scope="module")
def site_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteRows, dict[str, Any]]:
    """hospital-a's rows and a train config as the coordinator sends it (without dp keys)."""
    out = tmp_path_factory.mktemp("dp")
    generate(out, n_sites=4, seed=42)
    data = read_site_data(out / "hospital-a.csv", SCHEMA, [])
    split = split_site(data, seed=42)
    site = SiteSettings("hospital-a", out / "hospital-a.csv", (), out / "site-a", simulated=True)
    rows = SiteRows(site, SCHEMA, data, split, NO_POLICY, 42)
    prep = TabularPreprocessor(features=list(SCHEMA.shared_features)).fit(
        rows.shared.iloc[split.train])
    config = {"schema": "synthetic", "schema-digest": SCHEMA.digest(), "protocol": "default",
              "split-seed": 42, "test-fraction": 0.3, "model": "logreg", "hidden-units": 16,
              "cv-folds": 5, "repeat": 0, "run-id": 5, "server-round": 1,
              "preprocessing": json.dumps(prep.to_dict()), "local-epochs": 2,
              "learning-rate": 0.5, "batch-size": 0, "weight-decay": 0.001}
    return rows, config


def _arrays(config: dict[str, Any], rows: SiteRows, model: str = "logreg") -> Any:
    prep = TabularPreprocessor.from_dict(json.loads(config["preprocessing"]),
                                         list(SCHEMA.shared_features))
    return to_arrays(build_model(model, len(prep.feature_names_out_), 8, seed=3))


def _same(a: Any, b: Any) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_dp_off_is_bit_identical_to_a_config_without_dp(
    site_rows: tuple[SiteRows, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, model: str,
    task_identity: None,
) -> None:
    """With dp = "off" (every dp key set) training is exactly as before the keys existed.

    No DP code runs: the ledger is never touched.
    """
    rows, config = site_rows
    config = {**config, "model": model, "hidden-units": 8}

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("DP code ran with dp off")

    monkeypatch.setattr(privacy, "prepare_round", never)
    off = {**config, "dp": "off", "dp-epsilon": 3.0, "dp-delta": 1e-5, "dp-clip": 1.0,
           "num-server-rounds": 30, "repeats": 1}
    start = _arrays(config, rows, model)
    a, ma = train_job(rows, _train(rows, start, config))
    b, mb = train_job(rows, _train(rows, start, off, run_id=9))
    assert _same(a, b) and ma == mb
    if model == "logreg":
        start = _arrays(config, rows)
        a, ma = newton_job(rows, _train(rows, start, {**config, "strategy": "newton"}))
        b, mb = newton_job(rows, _train(rows, start, {**off, "strategy": "newton"}, 9))
        assert _same(a, b) and ma == mb
    assert not (rows.site.site_dir / LEDGER).exists()


def test_dp_rounds_reply_with_their_epsilon_and_stop_at_the_budget(
    site_rows: tuple[SiteRows, dict[str, Any]], tmp_path: Path, task_identity: None,
) -> None:
    """Newton and DP-SGD rounds with dp = record reply with the epsilon spent so far.

    The replies are noised, the ledger holds each round, and a round past the planned ones is
    refused with the rule named.
    """
    rows, config = site_rows
    rows = SiteRows(SiteSettings("hospital-a", rows.site.data_file, (), tmp_path / "site",
                                 simulated=True), rows.schema, rows.data, rows.split, NO_POLICY, 42)
    dp = {**config, "dp": "record", "dp-epsilon": 2.0, "dp-delta": 1e-5, "dp-clip": 1.0,
          "num-server-rounds": 2, "repeats": 1}
    start = _arrays(config, rows)
    exact, _ = newton_job(rows, _train(rows, start, {**config, "strategy": "newton"}))
    eps = []
    for rnd in (1, 2):
        arrays, metrics = newton_job(rows, _train(
            rows, start, {**dp, "strategy": "newton", "server-round": rnd}, run_id=7))
        assert set(metrics) == {*protocol.NEWTON_METRICS, *protocol.DP_METRICS}
        assert not np.array_equal(arrays[newton.GRAD].numpy(), exact[newton.GRAD].numpy())
        eps.append(float(metrics["dp-epsilon"]))  # type: ignore[arg-type]
    assert eps[0] < eps[1] <= 2.0 and eps[1] == pytest.approx(2.0, abs=0.05)
    with pytest.raises(PolicyRefusal) as err:
        newton_job(rows, _train(rows, start, {**dp, "strategy": "newton", "server-round": 3},
                                run_id=7))
    assert err.value.rule == "dp-epsilon"
    # DP-SGD in another run, mini-batches of 32 (Poisson sampled).
    sgd = {**dp, "batch-size": 32, "num-server-rounds": 3}
    arrays, metrics = train_job(rows, _train(rows, start, sgd, run_id=8))
    assert set(metrics) == {*protocol.TRAIN_METRICS, *protocol.DP_METRICS}
    assert metrics["train-loss"] == metrics["global-loss"] == 0.0  # withheld under DP
    spent = float(metrics["dp-epsilon"])  # type: ignore[arg-type]
    assert 0 < spent < 2.0
    assert not _same(arrays, start)
    ledger = json.loads((rows.site.site_dir / LEDGER).read_text())
    q, steps = dp_schedule(len(rows.split.train), 32, 2)
    assert ledger["runs"]["8"]["history"][0][1:] == [q, steps]
    assert ledger["total-epsilon"] == pytest.approx(eps[1] + spent)


def test_dp_sgd_learns_with_little_noise() -> None:
    """DP-SGD with a tiny noise multiplier and a loose clip moves toward the optimum."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (rng.random(400) < 1 / (1 + np.exp(-(x @ np.array([1.5, -1.0, 0.5]))))).astype(float)
    model = build_model("logreg", 3)
    train_local_dp(model, x, y, epochs=50, lr=0.5, batch_size=0, weight_decay=0.0,
                   proximal_mu=0.0, clip=10.0, noise_multiplier=0.01, entropy=1)
    weight = model.state_dict()["net.weight"].numpy()[0]
    assert np.all(np.sign(weight) == np.array([1, -1, 1]))


def test_client_level_dp_has_no_record_level_accounting() -> None:
    """Client-level DP is a setting (FedAvg / FedProx only), never record-level DP at a site."""
    from shared.settings import RunSettings, SettingsError

    assert RunSettings.from_run_config({"dp": "client"}).training == "fedavg"
    with pytest.raises(SettingsError, match="dp = client"):
        RunSettings.from_run_config({"dp": "client", "strategy": "newton"})
    rows = SimpleNamespace(dp=DPRequest("client", 3.0, 1e-5, 1.0, 30))
    with pytest.raises(ContractError, match="not a record-level DP round"):
        privacy.prepare_round(None, NO_POLICY, rows, 1.0, 1)  # type: ignore[arg-type]


def test_report_shows_each_site_s_epsilon_per_round_and_its_stop() -> None:
    """report.json: sites[name]["dp"] from the rounds' replies and the site's refusal."""
    from server.summary import RepeatResult, dp_entry

    r = RepeatResult(repeat=0, split_seed=42)
    r.rounds = [{"round": 1, "dp": {"a": {"epsilon": 1.2, "delta": 1e-5},
                                    "b": {"epsilon": 1.2, "delta": 1e-5}}},
                {"round": 2, "dp": {"a": {"epsilon": 1.8, "delta": 1e-5}}}]
    r.lost["b"] = {"round": 2, "reason": "[site b] refused by policy rule 'max-epsilon-total': "
                   "round 0/2 would bring the site's total epsilon to 4.1", "rounds_missed": [2]}
    a, b = dp_entry("a", [r]), dp_entry("b", [r])
    assert a is not None and b is not None and dp_entry("c", [r]) is None
    assert a["epsilon"] == 1.8 and a["stopped"] is None and len(a["per_round"]) == 2
    assert b["epsilon"] == 1.2 and b["stopped"]["round"] == 2
    assert "max-epsilon-total" in b["stopped"]["reason"]


def test_a_round_of_no_steps_is_refused_before_it_is_charged(
    site_rows: tuple[SiteRows, dict[str, Any]], tmp_path: Path, task_identity: None,
) -> None:
    """local-epochs 0 or below is a settings error, and the privacy ledger stays untouched."""
    rows, config = site_rows
    rows = SiteRows(SiteSettings("hospital-a", rows.site.data_file, (), tmp_path / "site",
                                 simulated=True), rows.schema, rows.data, rows.split, NO_POLICY, 42)
    dp = {**config, "dp": "record", "dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-clip": 1.0,
          "num-server-rounds": 2, "repeats": 1, "server-round": 1}
    for epochs in (0, -2):
        with pytest.raises(ContractError, match=r"local-epochs = .* is outside"):
            train_job(rows, _train(rows, _arrays(config, rows), {**dp, "local-epochs": epochs}))
    assert not (rows.site.site_dir / LEDGER).exists()
