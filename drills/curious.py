"""Drill: a curious coordinator attacks a real site's ClientApp, and what it recovers.

The coordinator chooses every setting, preprocessing and weight a site computes with. Here it
sends crafted messages straight to the site's real ClientApp (as a modified ServerApp would,
or the approved app run with a crafted ``--run-config``) and the drill measures what it learns,
each attack against two sites:

- the **protected** site, set up as the README's deployment steps say (``fedadapt init-site``,
  its default policy: differential privacy required, finite budgets, inputs clipped);
- a **control** that the attack is known to work on (a simulated site, which follows the
  run's split settings; a deployed site whose policy says ``require-dp = false``), so that a
  failure of the attack is the protection's doing, not a broken attack.

Success is judged by the drill (it reads the site's file and its split key: an oracle the
attacker does not have), and compared with chance and, under DP, with the bound the site's
epsilon puts on any attacker. The attack functions are used by ``tests/attacks`` too.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.contract import SourceModel
from client.data import SiteData, read_site_data
from client.site_setup import init_site
from client.split import keyed_split, split_key
from drills.base import DrillResult, drill
from shared import newton, protocol
from shared.preprocessing import TabularPreprocessor
from shared.schema import Schema, load_schema
from simulations.generator import generate

SCHEMA = "synthetic"
EPSILON = 3.0  # the default policy's max-epsilon-run: the most one run can spend
TARGET_AGE = 99.5  # the planted patient: older than anyone in the generated file


@dataclass
class Site:
    """A site under attack: the real ClientApp, called with the coordinator's messages."""

    name: str
    data_file: Path
    site_dir: Path
    node_config: dict[str, Any]
    state: RecordDict = field(default_factory=RecordDict)

    def ask(self, phase: str, config: dict[str, Any], arrays: ArrayRecord | None = None,
            run_id: int = 1, extra: dict[str, ArrayRecord] | None = None) -> Message:
        """Send one message of ``phase`` and return the site's reply.

        ``extra`` adds array records (a group round's frozen source model).
        """
        from client.client_app import app
        from simulations.inprocess import adopt_task_identity

        adopt_task_identity(run_id)
        mtype = {"stats": protocol.STATS, "train": protocol.TRAIN, "adapt": protocol.ADAPT,
                 "evaluate": protocol.EVALUATE}[phase]
        content = RecordDict({protocol.CONFIG: ConfigRecord(config)})
        if arrays is not None:
            content[protocol.ARRAYS] = arrays
        for key, record in (extra or {}).items():
            content[key] = record
        msg = Message(content=content, dst_node_id=1, message_type=mtype)
        msg.metadata.__dict__["_run_id"] = run_id
        context = Context(run_id=run_id, node_id=1, node_config=self.node_config,
                          state=self.state, run_config={})
        return app(msg, context)


def deployed_site(folder: Path, data_file: Path, policy: str = "", name: str = "target"
                  ) -> Site:
    """A site set up by the deployment steps: ``fedadapt init-site`` and its default policy.

    ``policy`` lines are appended to the written policy (a control's ``require-dp = false``).
    """
    made = init_site(folder, name)
    if policy:
        text = made.policy.read_text(encoding="utf-8")
        for line in policy.splitlines():
            key = line.split("=")[0].strip()
            text = "\n".join(t for t in text.splitlines() if not t.startswith(f"{key} ="))
            text += f"\n{line}\n"
        made.policy.write_text(text, encoding="utf-8")
    return Site(name, data_file, made.site_dir, {
        "data-file": str(data_file), "site-dir": str(made.site_dir), "site-name": name,
        "policy": str(made.policy)})


def simulated_site(folder: Path, data_file: Path, name: str = "target") -> Site:
    """A simulated site (the researcher owns it): it follows the run's split settings."""
    return Site(name, data_file, folder, {
        "data-file": str(data_file), "site-dir": str(folder), "site-name": name,
        "simulated": True})


def base_config(schema: Schema) -> dict[str, Any]:
    """What every message of a run says (the split settings a coordinator may craft)."""
    return {"schema": schema.name, "schema-digest": schema.digest(), "protocol": "default",
            "split-seed": 42, "test-fraction": 0.3, "model": "logreg", "hidden-units": 16,
            "cv-folds": 5, "repeat": 0}


@dataclass
class Outcome:
    """An attack's result at one site: trials, successes, and what chance would give."""

    site: str
    trials: int
    successes: int
    chance: float
    bound: float | None = None  # what the site's DP allows any attacker, at most
    note: str = ""

    @property
    def rate(self) -> float:
        """The attacker's success rate."""
        return self.successes / self.trials if self.trials else math.nan

    def to_json(self) -> dict[str, Any]:
        """As drills.json holds it."""
        return {"site": self.site, "trials": self.trials, "successes": self.successes,
                "rate": round(self.rate, 4), "chance": round(self.chance, 4),
                "bound": None if self.bound is None else round(self.bound, 4),
                "note": self.note}


def dp_bound(epsilon: float, delta: float = 1e-5) -> float:
    """Best success an attacker can have telling two neighbouring files apart under DP."""
    return math.exp(epsilon) / (1 + math.exp(epsilon)) + delta


# ------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class World:
    """A generated hospital's file, and the same file with one planted patient added."""

    schema: Schema
    without: Path
    with_target: Path
    target_cells: dict[str, str]


def make_world(folder: Path, seed: int = 7) -> World:
    """A generated hospital (400 rows) and a copy with one extra, extreme patient."""
    if folder.exists():
        shutil.rmtree(folder)
    generate(folder, n_sites=4, seed=seed)
    base = folder / "hospital-d.csv"
    lines = base.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    cells = dict.fromkeys(header, "")
    cells.update({"age": str(TARGET_AGE), "weight": "81.3", "height": "172",
                  "systolic_bp": "141", "diabetes": "0"})
    planted = folder / "hospital-d-with-target.csv"
    planted.write_text("\n".join([*lines, ",".join(cells[c] for c in header)]) + "\n",
                       encoding="utf-8")
    return World(load_schema(SCHEMA), base, planted, cells)


def _rows(data: SiteData) -> np.ndarray:
    """Shared features and label of every row (NaN where missing), for judging a recovery."""
    shared = data.features[list(data.shared_columns)].to_numpy(dtype=float)
    return np.hstack([shared, data.label[:, None].astype(float)])


def _summary(reply: Message) -> dict[str, list[float]]:
    metrics = reply.content.metric_records[protocol.METRICS]
    return {k: [float(x) for x in (v if isinstance(v, list) else [v])] for k, v in
            metrics.items()}


# ------------------------------------------------------------------- attack 1: stats


def differencing_stats(site: Site, schema: Schema, trials: int) -> Outcome:
    """Attack 1: two stats requests whose held-out sets differ by one row, subtracted.

    With the same ``split-seed`` and test fractions giving ``k`` and ``k + 1`` held-out rows,
    the training sets are nested; the difference of the two replies' sums is one patient's
    shared row, the label counts its label. Success: the difference equals a row of the file.
    """
    data = read_site_data(site.data_file, schema, [])
    rows = _rows(data)
    n = data.n_rows
    names = [f.name for f in schema.shared_features]
    successes = 0
    for t in range(trials):
        k = 60 + 7 * t
        replies = []
        for held in (k, k + 1):
            config = {**base_config(schema), "split-seed": 1000 + t,
                      "test-fraction": (held - 0.5) / n}
            reply = site.ask("stats", config)
            if reply.has_error():
                break
            replies.append(_summary(reply))
        if len(replies) < 2:
            continue
        a, b = replies
        cells = [a[f"{f}.sum"][0] - b[f"{f}.sum"][0] if a[f"{f}.count"][0]
                 != b[f"{f}.count"][0] else math.nan for f in names]
        label = a["label-positive"][0] - b["label-positive"][0]
        if not any(math.isfinite(c) for c in cells):
            continue
        guess = np.array([*cells, label])  # the row that left the training set
        observed = np.isfinite(guess)
        match = np.all(np.isclose(rows[:, observed], guess[observed], rtol=0, atol=1e-6),
                       axis=1)
        successes += bool(match.any())
    return Outcome(site.name, trials, successes, chance=0.0,
                   note="recovered one patient's whole shared row and label")


# ----------------------------------------------------- attack 2: crafted weights, no DP


def _threshold_model(schema: Schema, feature: str, threshold: float, scale: float = 1e-9
                     ) -> tuple[dict[str, Any], ArrayRecord]:
    """Preprocessing and weights that make the model a step at ``feature = threshold``."""
    numeric = [f for f in schema.shared_features if f.kind != "categorical"]
    names = [f.name for f in schema.shared_features]
    prep = {"features": names, "indicators": True,
            "mean": [threshold if f.name == feature else 0.0 for f in numeric],
            "scale": [scale if f.name == feature else 1.0 for f in numeric],
            "indicator_features": [f.name for f in schema.shared_features],
            "n_samples_seen": 1}
    out = TabularPreprocessor.from_dict(prep, list(schema.shared_features)).feature_names_out_
    weight = np.zeros((1, len(out)))
    weight[0, out.index(feature)] = 100.0
    arrays = ArrayRecord({"net.weight": Array(weight), "net.bias": Array(np.zeros(1))})
    return prep, arrays


def _newton_config(schema: Schema, prep: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**base_config(schema), "preprocessing": json.dumps(prep), "strategy": "newton",
            "local-epochs": 1, "learning-rate": 0.5, "batch-size": 0, "weight-decay": 0.0,
            "server-round": 1, **extra}


def crafted_weights(site: Site, schema: Schema, rounds: int = 40) -> Outcome:
    """Attack 2: step-function weights; each Newton round counts the rows past a threshold.

    A binary search over the threshold finds the oldest training patient's age to within
    82 / 2**rounds years. Success: within 0.01 of the true value (judged with the site's split
    key and file: an oracle).
    """
    low, high = 18.0, 100.0
    base_prep, base_arrays = _threshold_model(schema, "age", 1000.0)
    reference = site.ask("train", _newton_config(schema, base_prep), base_arrays)
    if reference.has_error():
        return Outcome(site.name, 1, 0, chance=0.0, note="refused: " + str(
            reference.error.reason).split(": ", 1)[-1][:120])
    none_above = float(reference.content.array_records[protocol.ARRAYS][newton.GRAD]
                       .numpy()[-1])
    for _ in range(rounds):
        mid = (low + high) / 2
        prep, arrays = _threshold_model(schema, "age", mid)
        reply = site.ask("train", _newton_config(schema, prep), arrays)
        grad = reply.content.array_records[protocol.ARRAYS][newton.GRAD].numpy()
        above = round(float(grad[-1]) - none_above)  # rows older than mid
        low, high = (mid, high) if above >= 1 else (low, mid)
    data = read_site_data(site.data_file, schema, [])
    split = keyed_split(data, split_key(site.site_dir), 0.3)
    ages = data.features["age"].to_numpy()[split.train]
    truth = float(np.nanmax(ages))
    found = (low + high) / 2
    return Outcome(site.name, 1, int(abs(found - truth) < 0.01), chance=0.0,
                   note=f"oldest training patient's age recovered as {found:.4f}")


# ------------------------------------------------- attack 2 under DP: membership game


def _membership_trial(world: World, folder: Path, present: bool, epsilon: float | None,
                      policy: str = "") -> bool:
    """One round of the game: is the planted patient in the site's file? True if guessed.

    The attacker sends the step model at a threshold just below the planted patient's age
    (only that patient is past it) for one Newton round, with ``dp-epsilon`` spent on it
    (``None``: no DP, at a site whose policy allows that). It knows every other row and the
    site's split (an oracle: the strongest attacker) and runs the likelihood-ratio test on the
    reply's gradient and loss along the planted patient's contribution.
    """
    data_file = world.with_target if present else world.without
    site = deployed_site(folder, data_file, policy if epsilon else "require-dp = false")
    prep, arrays = _threshold_model(world.schema, "age", TARGET_AGE - 0.25)
    clip = 1.0
    dp = {} if epsilon is None else {"dp": "record", "dp-epsilon": epsilon, "dp-delta": 1e-5,
                                     "dp-clip": clip, "num-server-rounds": 1, "repeats": 1}
    reply = site.ask("train", _newton_config(world.schema, prep, **dp), arrays)
    if reply.has_error():
        raise RuntimeError(f"the round was refused: {reply.error.reason}")
    noisy = reply.content.array_records[protocol.ARRAYS][newton.GRAD].numpy()
    loss_sum = reply.content.metric_records[protocol.METRICS]["loss-sum"]
    noisy_loss = float(loss_sum) if isinstance(loss_sum, int | float) else math.nan
    # The oracle: the exact sums of the rows other than the planted patient, as the site
    # computes them (each row's part clipped under DP).
    others = read_site_data(world.without, world.schema, [])
    split = keyed_split(others, split_key(site.site_dir), 0.3)
    source = SourceModel("logreg", 16, prep, arrays, 10.0)
    x = source.inputs(world.schema, others.features[list(others.shared_columns)])
    theta = newton.parameters(arrays)
    bounds = (clip, 0.25 * clip ** 2, 5.0)

    def sums(xs: np.ndarray, ys: np.ndarray) -> newton.Sums:
        if epsilon is None:
            return newton.site_sums(xs, ys, theta)
        return newton.clipped_site_sums(xs, ys, theta, *bounds)

    base = sums(x[split.train], others.label[split.train])
    target = read_site_data(world.with_target, world.schema, [])
    xt = source.inputs(world.schema, target.features[list(target.shared_columns)])[-1:]
    mine = sums(xt, target.label[-1:])
    # The likelihood-ratio test on the gradient and the loss (each part's noise is
    # proportional to its bound; the Hessian part carries nothing of this patient here).
    shift = np.append(mine.grad / bounds[0] ** 2, mine.loss / bounds[2] ** 2)
    observed = np.append(noisy - base.grad, noisy_loss - base.loss)
    expected = np.append(mine.grad, mine.loss)
    guess = float(shift @ observed) > float(shift @ expected) / 2
    return guess == present


def membership(world: World, folder: Path, trials: int, epsilon: float | None = EPSILON,
               seed: int = 0) -> Outcome:
    """Attack 2 as a game: is one patient in the file? (chance 0.5).

    With ``epsilon`` against a site set up by ``init-site`` (its default policy; above the
    default cap of 3 the site's policy allows that epsilon per run); with ``None`` against a
    site whose policy says ``require-dp = false`` (the control).
    """
    rng = random.Random(seed)
    policy = (f"max-epsilon-run = {epsilon}\nmax-epsilon-total = {2 * epsilon + 1}"
              if epsilon is not None and epsilon > EPSILON else "")
    successes = 0
    for t in range(trials):
        trial = folder / f"trial-{t}"
        successes += _membership_trial(world, trial, rng.random() < 0.5, epsilon, policy)
        shutil.rmtree(trial, ignore_errors=True)
    what = (f"epsilon {epsilon:g} on one Newton round" if epsilon is not None else "no DP")
    return Outcome("protected" if epsilon is not None else "control", trials, successes,
                   chance=0.5, bound=None if epsilon is None else dp_bound(epsilon),
                   note=f"{what}; the attacker knows every other row and the split; the "
                        "patient is held out (unseen by training) in about 30 % of trials")


# -------------------------------------------------------- attack 3: non-finite numbers


def overflow_probe(world: World, folder: Path, trials: int, seed: int = 1) -> Outcome:
    """Attack 3: a scale of 1e-152 makes a row's squared norm overflow; NaN or not, per file.

    On the landed code the NaN reached the reply (or its refusal) only when the extreme
    patient was there: a certain answer outside the DP bound. The attacker guesses
    "present" when the reply is an error or holds a non-finite number.
    """
    rng = random.Random(seed)
    successes = 0
    for t in range(trials):
        present = rng.random() < 0.5
        site = deployed_site(folder / f"trial-{t}", world.with_target if present
                             else world.without)
        prep, arrays = _threshold_model(world.schema, "age", TARGET_AGE - 0.25, scale=1e-152)
        config = _newton_config(world.schema, prep, dp="record", **{
            "dp-epsilon": EPSILON, "dp-delta": 1e-5, "dp-clip": 1.0, "num-server-rounds": 1,
            "repeats": 1})
        reply = site.ask("train", config, arrays)
        odd = reply.has_error() or not all(
            np.isfinite(reply.content.array_records[protocol.ARRAYS][k].numpy()).all()
            for k in reply.content.array_records[protocol.ARRAYS])
        successes += odd == present
        shutil.rmtree(folder / f"trial-{t}", ignore_errors=True)
    return Outcome("protected (DP)", trials, successes, chance=0.5, bound=dp_bound(EPSILON),
                   note="guess: present when the reply is refused or not finite")


# ------------------------------------------- the same tricks on adapt and evaluate


def model_replies_probe(site: Site, schema: Schema, thresholds: int = 12) -> Outcome:
    """Adapt and evaluate at step models over a sweep of thresholds: distinct answers count.

    Each answer computed at a threshold tells the coordinator something of the rows past it
    (held-out AUC, the model the site chose and its cross-validated scores). Success: the
    number of distinct replies beyond the first (0 when every reply is the same).
    """
    seen: set[str] = set()
    for i in range(thresholds):
        prep, arrays = _threshold_model(schema, "age", 30.0 + 5 * i)
        config = {**base_config(schema), "preprocessing": json.dumps(prep)}
        for phase in ("adapt", "evaluate"):
            reply = site.ask(phase, config, arrays, run_id=100 + i)
            seen.add(phase + ":" + (f"error {reply.error.reason}" if reply.has_error() else
                                    json.dumps(_summary(reply), sort_keys=True)))
    return Outcome(site.name, 2 * thresholds, len(seen) - 2, chance=0.0,
                   note="distinct adapt and evaluate replies beyond one each")


# --------------------------------------------------------------------------- the drill


CURIOUS = ("a coordinator sending crafted settings, preprocessing and weights to a site set up "
           "by `fedadapt init-site` (default policy) recovers no patient: differencing the "
           "stats gives nothing (0 rows), step-function weights are refused without DP, under "
           "DP the membership game stays within the epsilon bound, the overflow probe is at "
           "chance, adapt and evaluate replies never change; each attack works on its control")


@drill("curious-coordinator", CURIOUS, "in-process")
def curious_coordinator(out: Path, trials: int = 200) -> DrillResult:
    """Every attack against a protected site and its control; success against chance.

    Parameters
    ----------
    out : Path
        The drill's folder.
    trials : int
        Trials of each game (the membership and overflow games).

    Returns
    -------
    DrillResult
        Figure: per attack, the protected site's and the control's success.
    """
    world = make_world(out / "data")
    results: dict[str, list[Outcome]] = {}

    def run(name: str, *outcomes: Callable[[], Outcome]) -> None:
        results[name] = [f() for f in outcomes]

    run("1-differencing-stats",
        lambda: differencing_stats(deployed_site(out / "s1", world.without), world.schema, 20),
        lambda: differencing_stats(simulated_site(out / "c1", world.without), world.schema,
                                   20))
    run("2-crafted-weights",
        lambda: crafted_weights(deployed_site(out / "s2", world.without), world.schema),
        lambda: crafted_weights(deployed_site(out / "c2", world.without,
                                              "require-dp = false"), world.schema))
    run("2-membership", lambda: membership(world, out / "s2dp", trials),
        lambda: membership(world, out / "c2dp", trials, epsilon=None))
    for eps in (1.0, 10.0):  # what other budgets allow the same attacker
        results[f"2-membership-epsilon-{eps:g}"] = [
            membership(world, out / f"s2dp-{eps:g}", trials, epsilon=eps)]
    run("3-overflow", lambda: overflow_probe(world, out / "s3", trials))
    run("adapt-evaluate",
        lambda: model_replies_probe(deployed_site(out / "s5", world.without), world.schema),
        lambda: model_replies_probe(deployed_site(out / "c5", world.without,
                                                  "require-dp = false"), world.schema))
    for outcomes in results.values():
        outcomes[0].site = "protected"
        if len(outcomes) > 1:
            outcomes[1].site = "control"
    protected = {name: o[0] for name, o in results.items()}
    controls = {name: o[1] for name, o in results.items() if len(o) > 1}
    passed = bool(
        protected["1-differencing-stats"].successes == 0
        and controls["1-differencing-stats"].successes > 0
        and protected["2-crafted-weights"].successes == 0
        and controls["2-crafted-weights"].successes == 1
        and all(within_bound(o) for name, o in protected.items() if "membership" in name)
        and controls["2-membership"].rate > 0.75
        and within_bound(protected["3-overflow"], chance_only=True)
        and protected["adapt-evaluate"].successes == 0
        and controls["adapt-evaluate"].successes > 0)
    figure = {name: [o.to_json() for o in outcomes] for name, outcomes in results.items()}
    observed = "; ".join(
        f"{name}: protected {o[0].successes}/{o[0].trials}"
        + (f", control {o[1].successes}/{o[1].trials}" if len(o) > 1 else "")
        for name, o in results.items())
    return DrillResult("curious-coordinator", CURIOUS, observed, passed, figure)


def within_bound(outcome: Outcome, chance_only: bool = False, sds: float = 3.0) -> bool:
    """Whether a game's success rate is within ``sds`` standard errors of what DP allows.

    With ``chance_only``, of chance itself (an attack that DP should not even help).
    """
    limit = outcome.chance if chance_only or outcome.bound is None else outcome.bound
    se = math.sqrt(max(limit * (1 - limit), 0.25) / max(outcome.trials, 1))
    return outcome.rate <= limit + sds * se
