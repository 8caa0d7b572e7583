"""The bare ClientApp: a few full-batch gradient steps of logistic regression on random rows.

The rows are made from the node id at every message (nothing is read, kept or checked), so
the work is the least a node training fedadapt's logistic source model can do.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def make_rows(node_id: int, rows: int, n_inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows of one node: standard normal inputs, labels from a fixed true model.

    Parameters
    ----------
    node_id : int
        Seeds the node's rows (Flower's node id; any non-negative integer).
    rows, n_inputs : int
        Shape of the inputs.

    Returns
    -------
    X : numpy.ndarray
        ``(rows, n_inputs)`` inputs.
    y : numpy.ndarray
        ``(rows,)`` labels, 0 or 1.
    """
    truth = np.random.default_rng(0).normal(size=n_inputs)
    rng = np.random.default_rng(node_id)
    X = rng.normal(size=(rows, n_inputs))
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-(X @ truth)))).astype(np.float64)
    return X, y


def gradient_steps(
    weight: np.ndarray, bias: np.ndarray, X: np.ndarray, y: np.ndarray, steps: int, lr: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Full-batch gradient descent on the mean logistic loss.

    Parameters
    ----------
    weight : numpy.ndarray
        ``(1, n_inputs)`` weights.
    bias : numpy.ndarray
        ``(1,)`` intercept.
    X, y : numpy.ndarray
        Inputs and 0/1 labels.
    steps : int
        Number of gradient steps.
    lr : float
        Step size.

    Returns
    -------
    weight, bias : numpy.ndarray
        The updated parameters, shaped as given (float32, as a torch model's).
    loss : float
        Mean logistic loss before the last step.
    """
    w = weight.astype(np.float64).ravel()
    b = float(bias.astype(np.float64)[0])
    loss = float("nan")
    for _ in range(steps):
        z = X @ w + b
        p = 1.0 / (1.0 + np.exp(-z))
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
        residual = p - y
        w = w - lr * (X.T @ residual) / len(y)
        b = b - lr * float(np.mean(residual))
    return (w.reshape(weight.shape).astype(np.float32),
            np.array([b], dtype=np.float32), loss)


def _number(config: ConfigRecord, key: str) -> float:
    """A number the ServerApp sent in the message's config."""
    value = config[key]
    if not isinstance(value, int | float):
        raise TypeError(f"config {key!r} should be a number, not {type(value).__name__}")
    return float(value)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's random rows; reply with the arrays and the number of rows."""
    config = msg.content.config_records["config"]
    arrays = msg.content.array_records["arrays"]
    rows = int(context.run_config["rows"])
    X, y = make_rows(context.node_id, rows, int(context.run_config["n-inputs"]))
    weight, bias, loss = gradient_steps(
        arrays["weight"].numpy(), arrays["bias"].numpy(), X, y,
        steps=int(_number(config, "local-steps")), lr=_number(config, "learning-rate"),
    )
    return Message(content=RecordDict({
        "arrays": ArrayRecord({"weight": Array(weight), "bias": Array(bias)}),
        "metrics": MetricRecord({"num-examples": rows, "train-loss": loss}),
    }), reply_to=msg)
