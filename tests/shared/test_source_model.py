"""Tests of the shared source model: construction, objective and weight transport."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from shared.source_model import (
    build_model,
    load_arrays,
    objective,
    predict_logit,
    to_arrays,
)


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _obj(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, wd: float) -> float:
    with torch.no_grad():
        return float(objective(model, x, y, wd))


def test_logreg_starts_at_zero() -> None:
    """Logistic regression starts with zero weights and bias (logit 0 for every row)."""
    model = build_model("logreg", 6, seed=123)
    for name, value in _state(model).items():
        assert not value.any(), name
    assert next(model.parameters()).dtype == torch.float64
    np.testing.assert_array_equal(predict_logit(model, np.ones((4, 6))), np.zeros(4))


def test_mlp_init_is_seed_deterministic() -> None:
    """The same seed gives the same MLP, another seed another one; global RNG untouched."""
    before = torch.get_rng_state()
    a, b = build_model("mlp", 5, 8, seed=3), build_model("mlp", 5, 8, seed=3)
    c = build_model("mlp", 5, 8, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert list(sa) == list(sb) == list(sc)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["net.0.weight"], sc["net.0.weight"])
    assert sa["net.0.weight"].shape == (8, 5)
    assert predict_logit(a, np.ones((3, 5))).shape == (3,)


def test_build_model_rejects_bad_arguments() -> None:
    """An unknown kind or no inputs raise a ValueError."""
    with pytest.raises(ValueError, match="unknown model"):
        build_model("forest", 3)
    with pytest.raises(ValueError, match="at least one input"):
        build_model("logreg", 0)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_arrays_round_trip(kind: str) -> None:
    """to_arrays then load_arrays into a fresh model reproduces weights and predictions."""
    src = build_model(kind, 4, 6, seed=1)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.linspace(-1.0, 1.0, p.numel(), dtype=p.dtype).reshape(p.shape))
    dst = load_arrays(build_model(kind, 4, 6, seed=2), to_arrays(src))
    s, d = _state(src), _state(dst)
    assert all(np.array_equal(s[k], d[k]) for k in s)
    x = np.random.default_rng(0).normal(size=(10, 4))
    np.testing.assert_array_equal(predict_logit(dst, x), predict_logit(src, x))


def test_load_arrays_casts_float32() -> None:
    """Float32 weights of the right names and shapes load into the float64 model."""
    src = build_model("mlp", 3, 4, seed=0)
    arrays = ArrayRecord({k: v.float() for k, v in src.state_dict().items()})
    dst = load_arrays(build_model("mlp", 3, 4, seed=9), arrays)
    assert all(p.dtype == torch.float64 for p in dst.parameters())


def test_load_arrays_rejects_wrong_names_and_shapes() -> None:
    """Other names, other shapes or an extra array give a ValueError naming both layouts."""
    logreg4 = build_model("logreg", 4)
    with pytest.raises(ValueError, match="do not fit the source model") as err:
        load_arrays(logreg4, to_arrays(build_model("mlp", 4, 6)))
    assert "net.0.weight" in str(err.value) and "net.weight" in str(err.value)
    with pytest.raises(ValueError, match=r"do not fit the source model.*\(1, 3\).*\(1, 4\)"):
        load_arrays(logreg4, to_arrays(build_model("logreg", 3)))
    extra = {**build_model("logreg", 4).state_dict(), "net.extra": torch.zeros(2)}
    with pytest.raises(ValueError, match="do not fit the source model"):
        load_arrays(logreg4, ArrayRecord(extra))
    # The target model is untouched after a refused load.
    assert not any(v.any() for v in _state(logreg4).values())


def test_objective_weight_decay_ignores_biases() -> None:
    """Weight decay adds weight_decay / 2 * ||weights||^2 and never penalises a bias."""
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(20, 3)))
    y = torch.as_tensor((np.arange(20) % 2).astype(float))
    model = build_model("logreg", 3)
    with torch.no_grad():
        _param(model, "net.bias").fill_(5.0)
    assert _obj(model, x, y, 0.7) == _obj(model, x, y, 0.0)
    with torch.no_grad():
        _param(model, "net.weight").copy_(torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64))
    diff = _obj(model, x, y, 0.7) - _obj(model, x, y, 0.0)
    assert diff == pytest.approx(0.5 * 0.7 * (1.0 + 4.0 + 0.25), rel=1e-12)

    mlp = build_model("mlp", 3, 4, seed=0)
    weights = sum(float((p * p).sum().detach()) for n, p in mlp.named_parameters() if "weight" in n)
    diff = _obj(mlp, x, y, 0.2) - _obj(mlp, x, y, 0.0)
    assert diff == pytest.approx(0.1 * weights, rel=1e-12)
    base = _obj(mlp, x, y, 0.0)
    with torch.no_grad():
        expected = float(torch.nn.functional.binary_cross_entropy_with_logits(mlp(x), y))
    assert base == pytest.approx(expected, rel=1e-12)


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter of the model by its state-dict name."""
    return dict(model.named_parameters())[name]
