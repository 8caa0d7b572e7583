"""Tests of the local-only baseline and of local training of the source model."""

import copy

import numpy as np
import pytest
import torch

from client.data import read_site_data
from client.local_model import fit_predict_local
from client.split import split_site
from client.train import train_local
from shared.metrics import binary_metrics, sigmoid
from shared.schema import load_schema
from shared.source_model import build_model, objective
from simulations.generator import generate


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generate hospital-a (shared features and glucose) and split it 70/30."""
    out = tmp_path_factory.mktemp("sites")
    generate(out, n_sites=4, seed=42)
    schema = load_schema("synthetic")
    data = read_site_data(out / "hospital-a.csv", schema, ["glucose"])
    split = split_site(data, seed=42)
    features = [*schema.shared_features, schema.feature("glucose")]
    return {"data": data, "split": split, "features": features}


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _problem(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (rng.random(n) < sigmoid(x @ np.array([1.5, -1.0, 0.5]) + 0.3)).astype(float)
    return x, y


def _objective(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, wd: float) -> float:
    with torch.no_grad():
        return float(objective(model, torch.as_tensor(x), torch.as_tensor(y), wd))


def test_local_model_predicts_probabilities(hospital: dict) -> None:
    """One probability in (0, 1) per held-out row, better than chance on generated data."""
    data, split = hospital["data"], hospital["split"]
    p = fit_predict_local(
        data.features.iloc[split.train], data.label[split.train],
        data.features.iloc[split.test], hospital["features"], seed=0,
    )
    assert p.shape == (len(split.test),)
    assert np.all((p > 0) & (p < 1))
    assert binary_metrics(data.label[split.test], p)["auc"] > 0.6
    again = fit_predict_local(
        data.features.iloc[split.train], data.label[split.train],
        data.features.iloc[split.test], hospital["features"], seed=0,
    )
    np.testing.assert_array_equal(p, again)


@pytest.mark.parametrize("positives, expected", [(0, 0.01), (1, 1 / 50), (49, 49 / 50)])
def test_local_model_predicts_prevalence_for_tiny_class(
    hospital: dict, positives: int, expected: float
) -> None:
    """With fewer than two rows of a class the local model predicts the training prevalence."""
    rows = hospital["data"].features.iloc[:50]
    y = np.zeros(50, dtype=int)
    y[:positives] = 1
    test_rows = hospital["data"].features.iloc[50:57]
    p = fit_predict_local(rows, y, test_rows, hospital["features"])
    np.testing.assert_allclose(p, np.full(7, expected))


def test_train_local_reduces_objective() -> None:
    """Training lowers the objective; it returns (objective before, mean step loss)."""
    x, y = _problem()
    for batch_size in (0, 32):
        model = build_model("logreg", 3)
        start = _objective(model, x, y, 0.01)
        before, mean_loss = train_local(model, x, y, epochs=20, lr=0.5,
                                        batch_size=batch_size, weight_decay=0.01)
        assert before == pytest.approx(start, rel=1e-12)
        assert before == pytest.approx(np.log(2.0), rel=1e-12)  # zero weights: logit 0
        after = _objective(model, x, y, 0.01)
        assert after < mean_loss < before


def test_one_full_batch_epoch_is_one_gradient_step() -> None:
    """Full batch and one epoch: the update equals one gradient-descent step, by hand."""
    x, y = _problem(seed=1)
    w0, b0, lr, wd = np.array([0.2, -0.4, 0.1]), 0.3, 0.7, 0.05
    model = build_model("logreg", 3)
    with torch.no_grad():
        _param(model, "net.weight").copy_(torch.as_tensor(w0[None, :]))
        _param(model, "net.bias").fill_(b0)
    start = _objective(model, x, y, wd)
    before, mean_loss = train_local(model, x, y, epochs=1, lr=lr, weight_decay=wd)
    assert before == pytest.approx(start, rel=1e-12)
    assert mean_loss == pytest.approx(start, rel=1e-12)

    r = sigmoid(x @ w0 + b0) - y
    w1 = w0 - lr * (x.T @ r / len(y) + wd * w0)  # weight decay on weights only
    b1 = b0 - lr * r.mean()
    weight = _param(model, "net.weight").detach().numpy()[0]
    np.testing.assert_allclose(weight, w1, rtol=0, atol=1e-12)
    assert float(_param(model, "net.bias").detach()[0]) == pytest.approx(b1, abs=1e-12)


def test_one_full_batch_epoch_is_one_gradient_step_mlp() -> None:
    """The same holds for the MLP (the proximal term is zero at the start): autograd by hand."""
    x, y = _problem(seed=2)
    model = build_model("mlp", 3, 5, seed=0)
    manual = copy.deepcopy(model)
    loss = objective(manual, torch.as_tensor(x), torch.as_tensor(y), 0.01)
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    expected = [p.detach() - 0.3 * g for p, g in zip(manual.parameters(), grads, strict=True)]
    train_local(model, x, y, epochs=1, lr=0.3, weight_decay=0.01, proximal_mu=0.5)
    for got, want in zip(_params(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_proximal_term_keeps_weights_near_start() -> None:
    """proximal_mu > 0 ends closer to the received weights than mu = 0."""
    x, y = _problem(seed=3)
    start = build_model("mlp", 3, 5, seed=1)
    distances = {}
    for mu in (0.0, 1.0):
        model = copy.deepcopy(start)
        train_local(model, x, y, epochs=30, lr=0.5, batch_size=50, proximal_mu=mu, seed=0)
        distances[mu] = sum(float(((p - q) ** 2).sum())
                            for p, q in zip(_params(model), _params(start), strict=True))
    assert 0 < distances[1.0] < distances[0.0]


def test_mini_batches_are_seeded() -> None:
    """The same seed gives the same weights; no rows raise a ValueError."""
    x, y = _problem(seed=4)
    a, b = build_model("logreg", 3), build_model("logreg", 3)
    train_local(a, x, y, epochs=3, lr=0.5, batch_size=16, seed=5)
    train_local(b, x, y, epochs=3, lr=0.5, batch_size=16, seed=5)
    for p, q in zip(_params(a), _params(b), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="no training rows"):
        train_local(a, np.zeros((0, 3)), np.zeros(0), epochs=1, lr=0.1)


def test_local_model_uses_site_features_missing_everywhere(hospital: dict) -> None:
    """A site feature absent from the frame is imputed; predictions stay finite."""
    data, split = hospital["data"], hospital["split"]
    train = data.features.iloc[split.train].drop(columns=["glucose"])
    test = data.features.iloc[split.test].drop(columns=["glucose"])
    p = fit_predict_local(train, data.label[split.train], test, hospital["features"])
    assert p.shape == (len(split.test),) and np.all(np.isfinite(p))


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter of the model by its state-dict name."""
    return dict(model.named_parameters())[name]
