"""Seeded synthetic hospitals with a known diabetes model: site CSVs, a manifest and the truth."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.site import write_manifest

log = logging.getLogger(__name__)

SCHEMA_NAME = "synthetic"
MANIFEST_NAME = "sites.toml"
TRUTH_NAME = "truth.json"
LABEL = "diabetes"

# Shared effects of the true model, per unit of each centred variable.
BETA_AGE = 0.04
BETA_BMI = 0.06
BETA_BP = 0.02
BETA_GLUCOSE = 0.09
CENTER_AGE = 50.0
CENTER_BMI = 27.0
CENTER_BP = 130.0
CENTER_GLUCOSE = 105.0

# Latent glucose: GLU_BASE + GLU_BMI*(bmi-27) + GLU_AGE*(age-50) + N(0, GLU_SD), clipped.
GLU_BASE = 95.0
GLU_BMI = 1.2
GLU_AGE = 0.3
GLU_SD = 15.0
GLU_CLIP = (55.0, 400.0)

# Systolic blood pressure: BP_BASE + offset + BP_AGE*(age-50) + BP_BMI*(bmi-27) + N(0, BP_SD).
BP_BASE = 122.0
BP_AGE = 0.5
BP_BMI = 0.9
BP_SD = 14.0
BP_CLIP = (85.0, 220.0)

# HbA1c (the second site-only feature, in the ``hba1c`` world only): it follows glucose, and
# has an effect of its own on the true logit: HBA1C_BASE + HBA1C_GLU*(glucose-105)
# + N(0, HBA1C_SD), clipped; effect BETA_HBA1C*(hba1c-CENTER_HBA1C).
HBA1C_BASE = 5.5
HBA1C_GLU = 0.012
HBA1C_SD = 0.45
HBA1C_CLIP = (4.0, 14.0)
BETA_HBA1C = 0.8
CENTER_HBA1C = 5.5
# The role sites that measure HbA1c in that world (two of them also measure glucose).
HBA1C_ROLES = ("hospital-b", "hospital-c", "hospital-f", "hospital-h")
HBA1C_SHARE = 0.4  # chance that a site beyond the roles measures it

AGE_CLIP = (18.0, 95.0)
HEIGHT_CLIP = (140.0, 205.0)
BMI_CLIP = (16.0, 55.0)

ERROR_RATE = 0.003
# Intercepts of the eight role sites (see _role_spec), set for their expected prevalences.
INTERCEPTS = (-1.38, -0.42, -0.64, -2.78, -1.36, -1.66, -1.22, -0.55)
# Data-entry errors per column, every one outside the schema's valid range.
ERROR_VALUES: dict[str, tuple[str, ...]] = {
    "weight": ("0", "999"),
    "height": ("0", "1.75"),
    "systolic_bp": ("0", "999"),
    "glucose": ("0", "9999"),
    "hba1c": ("0", "99"),
}


@dataclass(frozen=True)
class HospitalSpec:
    """Population and recording parameters of one generated hospital.

    Parameters
    ----------
    name : str
        Site name (``hospital-a``, ...).
    role : str
        What the site stands for in the simulation, for people.
    n : int
        Number of patients (rows).
    age_mean, age_sd : float
        Normal age distribution (years, clipped to 18-95).
    bmi_mean, bmi_sd : float
        Normal body-mass-index distribution (kg/m², clipped to 16-55).
    height_mean, height_sd : float
        Normal height distribution (cm, clipped to 140-205); weight follows from BMI.
    bp_offset : float
        Site shift of the mean systolic blood pressure (mmHg).
    intercept : float
        Site intercept ``b_site`` of the true logit (label shift).
    glucose_measured : bool
        Whether the site's file has a ``glucose`` column (a site feature).
    has_bp : bool
        Whether the site's file has a ``systolic_bp`` column.
    missing_rate : float
        Probability that a weight, height, blood-pressure or glucose cell is left empty.
    label_noise : float
        Probability that a drawn label is flipped.
    slopes : tuple of float
        Site-specific factors on the shared age, BMI and blood-pressure effects (1: the shared
        effect): the moderate deviations every real site shows around a common model.
    extra_bp_effect : float
        Site-specific addition to the blood-pressure slope:
        ``site_extra = extra_bp_effect*(systolic_bp-130)``. Negative at a referral centre whose
        high-risk patients are already treated for hypertension, so that recorded pressure
        runs against risk there: a local effect the shared model cannot capture.
    error_rate : float
        Fraction of rows with one data-entry error outside the valid range (at least one
        per site).
    hba1c_effect : bool
        The world has HbA1c, with its own effect on the true logit (``generate(hba1c=True)``).
    hba1c_measured : bool
        Whether the site's file has an ``hba1c`` column (a site feature).
    """

    name: str
    role: str
    n: int
    age_mean: float
    age_sd: float
    bmi_mean: float
    bmi_sd: float
    height_mean: float
    height_sd: float
    bp_offset: float
    intercept: float
    glucose_measured: bool
    has_bp: bool
    missing_rate: float
    label_noise: float = 0.0
    slopes: tuple[float, float, float] = (1.0, 1.0, 1.0)
    extra_bp_effect: float = 0.0
    error_rate: float = ERROR_RATE
    hba1c_effect: bool = False
    hba1c_measured: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns of the site's CSV file, label last."""
        cols = ["age", "weight", "height"]
        if self.has_bp:
            cols.append("systolic_bp")
        cols += list(self.site_features)
        return (*cols, LABEL)

    @property
    def site_features(self) -> tuple[str, ...]:
        """Site-only features the manifest lists for this site."""
        return tuple(name for name, measured in (("glucose", self.glucose_measured),
                                                 ("hba1c", self.hba1c_measured)) if measured)


def site_name(index: int) -> str:
    """Return the name of site ``index`` (0-based): ``hospital-a`` to ``-z``, then numbers.

    Parameters
    ----------
    index : int
        Position of the site, from 0.

    Returns
    -------
    str
        ``hospital-a`` ... ``hospital-z`` for 0-25, then ``hospital-27``, ``hospital-28``, ...
    """
    if index < 0:
        raise ValueError("site index must be >= 0")
    if index < 26:
        return f"hospital-{chr(ord('a') + index)}"
    return f"hospital-{index + 1}"


# The default federation (eight sites) mirrors what real multi-site cohorts look like. The
# four UCI Heart Disease centres, for instance, hold 123 to 303 patients with 36 % to 94 % of
# them diseased; consortia of hospitals and practices span a wider range still, from a few
# large hospitals with hundreds of patients to practices with a few dozen, and outcomes that
# are rare at some sites. Here: two large hospitals (900, 700), two mid-sized (400, 250) and
# four small sites (100, 80, 60, 40); expected prevalence from about 5 % to about 45 %; one
# shared model with moderate per-site slope factors (0.85-1.15), one site whose recorded blood
# pressure runs against risk, one with noisy labels, glucose measured at four of the eight.
# The intercepts were set once so that each site's expected prevalence is the one named in
# its role (computed from the true model, before any method was run on the data).
ROLES = 8


def _role_spec(index: int) -> HospitalSpec:
    """Return the fixed spec of one of the eight role sites."""
    name = site_name(index)
    specs = [
        HospitalSpec(
            name=name, role="large hospital; baseline population; measures glucose (~20 %)",
            n=900, age_mean=52.0, age_sd=13.0, bmi_mean=27.5, bmi_sd=5.0,
            height_mean=170.0, height_sd=9.0, bp_offset=0.0, intercept=INTERCEPTS[0],
            glucose_measured=True, has_bp=True, missing_rate=0.05,
        ),
        HospitalSpec(
            name=name,
            role=("large hospital; older, higher baseline risk than its covariates explain; "
                  "treated hypertension reverses the blood-pressure effect (~45 %)"),
            n=700, age_mean=64.0, age_sd=11.0, bmi_mean=28.5, bmi_sd=5.0,
            height_mean=168.0, height_sd=9.0, bp_offset=6.0, intercept=INTERCEPTS[1],
            glucose_measured=False, has_bp=True, missing_rate=0.04,
            slopes=(0.9, 1.1, 1.0), extra_bp_effect=-2 * BETA_BP,
        ),
        HospitalSpec(
            name=name, role="small site; younger and lighter; low prevalence; measures glucose "
                            "(~10 %)",
            n=100, age_mean=38.0, age_sd=11.0, bmi_mean=24.5, bmi_sd=4.0,
            height_mean=172.0, height_sd=9.0, bp_offset=-5.0, intercept=INTERCEPTS[2],
            glucose_measured=True, has_bp=True, missing_rate=0.08, slopes=(1.1, 0.9, 1.0),
        ),
        HospitalSpec(
            name=name, role="mid-sized; noisy labels (15 % flipped); exports no blood pressure "
                            "(~25 %)",
            n=400, age_mean=56.0, age_sd=14.0, bmi_mean=29.5, bmi_sd=5.5,
            height_mean=167.0, height_sd=9.5, bp_offset=3.0, intercept=INTERCEPTS[3],
            glucose_measured=False, has_bp=False, missing_rate=0.06, label_noise=0.15,
        ),
        HospitalSpec(
            name=name, role="mid-sized district hospital; heavier population; measures glucose "
                            "(~30 %)",
            n=250, age_mean=58.0, age_sd=12.0, bmi_mean=29.0, bmi_sd=5.5,
            height_mean=169.0, height_sd=9.0, bp_offset=2.0, intercept=INTERCEPTS[4],
            glucose_measured=True, has_bp=True, missing_rate=0.05, slopes=(1.15, 0.85, 1.0),
        ),
        HospitalSpec(
            name=name, role="small rural practice (~25 %)",
            n=80, age_mean=60.0, age_sd=12.0, bmi_mean=28.0, bmi_sd=5.0,
            height_mean=168.0, height_sd=9.0, bp_offset=4.0, intercept=INTERCEPTS[5],
            glucose_measured=False, has_bp=True, missing_rate=0.07, slopes=(0.85, 1.15, 1.1),
        ),
        HospitalSpec(
            name=name, role="small sports-medicine clinic; young and fit; rare outcome (~5 %)",
            n=60, age_mean=35.0, age_sd=10.0, bmi_mean=24.0, bmi_sd=3.5,
            height_mean=175.0, height_sd=8.0, bp_offset=-6.0, intercept=INTERCEPTS[6],
            glucose_measured=False, has_bp=True, missing_rate=0.05, slopes=(1.0, 1.1, 0.9),
        ),
        HospitalSpec(
            name=name, role="small endocrinology clinic; referred patients; measures glucose "
                            "(~40 %)",
            n=40, age_mean=55.0, age_sd=12.0, bmi_mean=30.0, bmi_sd=6.0,
            height_mean=168.0, height_sd=9.0, bp_offset=0.0, intercept=INTERCEPTS[7],
            glucose_measured=True, has_bp=True, missing_rate=0.05, slopes=(1.05, 0.95, 1.0),
        ),
    ]
    if not 0 <= index < ROLES:
        raise ValueError(f"site {index} has no fixed role")
    return specs[index]


def _random_spec(index: int, rng: np.random.Generator) -> HospitalSpec:
    """Draw the spec of a site beyond the four roles."""

    def draw(low: float, high: float) -> float:
        return round(float(rng.uniform(low, high)), 3)

    return HospitalSpec(
        name=site_name(index),
        role="randomly drawn shifts",
        # Log-uniform from 30 to 900 patients: most sites are small, a few are large.
        n=round(math.exp(rng.uniform(math.log(30), math.log(900)))),
        age_mean=draw(35.0, 65.0),
        age_sd=draw(9.0, 15.0),
        bmi_mean=draw(24.0, 30.0),
        bmi_sd=draw(4.0, 6.0),
        height_mean=draw(164.0, 176.0),
        height_sd=draw(8.0, 10.0),
        bp_offset=draw(-8.0, 8.0),
        intercept=draw(-1.8, -0.4),
        glucose_measured=bool(rng.random() < 0.3),
        has_bp=True,
        missing_rate=draw(0.03, 0.10),
        slopes=(draw(0.85, 1.15), draw(0.85, 1.15), draw(0.85, 1.15)),
    )


def _seeds(n_sites: int, seed: int) -> list[tuple[np.random.SeedSequence, np.random.SeedSequence]]:
    """Per-site (spec, data) seed sequences; site k's do not depend on ``n_sites``."""
    return [
        (pair[0], pair[1])
        for pair in (child.spawn(2) for child in np.random.SeedSequence(seed).spawn(n_sites))
    ]


def hospital_specs(n_sites: int = ROLES, seed: int = 42, hba1c: bool = False
                   ) -> list[HospitalSpec]:
    """Return the specs of ``n_sites`` generated hospitals.

    Parameters
    ----------
    n_sites : int
        Number of sites (at least 1). Sites 0-7 take the fixed roles of the default federation
        (see ``_role_spec``); later sites draw their sizes and shifts from ``seed``.
    seed : int
        Seed of the random shifts of sites 4 and later.
    hba1c : bool
        The world with HbA1c (``HBA1C_ROLES`` and a share ``HBA1C_SHARE`` of the later
        sites measure it, drawn after every other draw of the spec, so that every other
        field is the same as without it).

    Returns
    -------
    list of HospitalSpec
        One spec per site, in order.
    """
    if n_sites < 1:
        raise ValueError("n_sites must be at least 1")
    specs = []
    for k, (spec_seed, _) in enumerate(_seeds(n_sites, seed)):
        if k < ROLES:
            spec = _role_spec(k)
            measured = spec.name in HBA1C_ROLES
        else:
            rng = np.random.default_rng(spec_seed)
            spec = _random_spec(k, rng)
            measured = bool(rng.random() < HBA1C_SHARE)
        specs.append(replace(spec, hba1c_effect=True, hba1c_measured=measured) if hba1c
                     else spec)
    return specs


def hba1c_mean(glucose: np.ndarray) -> np.ndarray:
    """Conditional mean of HbA1c given glucose (before clipping)."""
    return HBA1C_BASE + HBA1C_GLU * (glucose - CENTER_GLUCOSE)


def glucose_mean(age: np.ndarray, bmi: np.ndarray) -> np.ndarray:
    """Conditional mean of the latent glucose given age and BMI (before clipping)."""
    return GLU_BASE + GLU_BMI * (bmi - CENTER_BMI) + GLU_AGE * (age - CENTER_AGE)


def true_logit(
    spec: HospitalSpec, age: np.ndarray, bmi: np.ndarray, sbp: np.ndarray, glucose: np.ndarray,
    hba1c: np.ndarray | None = None,
) -> np.ndarray:
    """Return the true log-odds of diabetes at the site of ``spec``.

    HbA1c has its part in the ``hba1c`` world only.
    """
    f_age, f_bmi, f_bp = spec.slopes
    logit = (
        spec.intercept
        + f_age * BETA_AGE * (age - CENTER_AGE)
        + f_bmi * BETA_BMI * (bmi - CENTER_BMI)
        + (f_bp * BETA_BP + spec.extra_bp_effect) * (sbp - CENTER_BP)
        + BETA_GLUCOSE * (glucose - CENTER_GLUCOSE)
    )
    if spec.hba1c_effect and hba1c is not None:
        logit = logit + BETA_HBA1C * (hba1c - CENTER_HBA1C)
    return logit


@dataclass
class _Site:
    """One generated site: file text and the statistics written to the truth."""

    text: str
    best_auc: float
    n: int
    prevalence: float
    fraction_flipped: float
    auc_true_logit: float | None
    auc_without_glucose: float | None
    missing_cells: int
    error_cells: int


def _aucs(label: np.ndarray, *scores: np.ndarray) -> list[float | None]:
    """AUC of each score against ``label`` (``None`` when only one class is present)."""
    import sklearn  # here, not at the top: the command imports this module for its defaults
    from sklearn.metrics import roc_auc_score

    if label.min() == label.max():
        return [None] * len(scores)
    # One call for all scores (a multilabel problem, one column per score): with thousands of
    # sites, sklearn's per-call checks cost more than the AUCs themselves.
    with sklearn.config_context(assume_finite=True):
        aucs = roc_auc_score(
            np.repeat(label[:, None], len(scores), axis=1), np.column_stack(scores), average=None
        )
    return [round(float(a), 6) for a in np.atleast_1d(aucs)]


def _format(values: np.ndarray, decimals: int) -> list[str]:
    if decimals == 0:
        return [str(v) for v in np.rint(values).astype(np.int64).tolist()]
    return [f"{v:.{decimals}f}" for v in np.round(values, decimals).tolist()]


@dataclass
class _Patients:
    """Drawn patients of one site (true values, before recording)."""

    age: np.ndarray
    height: np.ndarray
    weight: np.ndarray
    bmi: np.ndarray
    sbp: np.ndarray
    glucose: np.ndarray
    logit: np.ndarray
    label: np.ndarray
    flipped: np.ndarray
    hba1c: np.ndarray | None = None

    def best_score(self, spec: HospitalSpec) -> np.ndarray:
        """The best risk score from what the site records (the true logit).

        Unrecorded glucose or blood pressure is replaced by its expected value given the rest.
        """
        sbp = self.sbp if spec.has_bp else (
            BP_BASE + spec.bp_offset + BP_AGE * (self.age - CENTER_AGE)
            + BP_BMI * (self.bmi - CENTER_BMI))
        glucose = self.glucose if spec.glucose_measured else glucose_mean(self.age, self.bmi)
        hba1c = self.hba1c if spec.hba1c_measured else hba1c_mean(glucose)
        return true_logit(spec, self.age, self.bmi, sbp, glucose, hba1c)


def _draw(spec: HospitalSpec, rng: np.random.Generator, n: int) -> _Patients:
    """Draw ``n`` patients of the site of ``spec`` and their labels."""
    age = np.rint(np.clip(rng.normal(spec.age_mean, spec.age_sd, n), *AGE_CLIP))
    height = np.rint(np.clip(rng.normal(spec.height_mean, spec.height_sd, n), *HEIGHT_CLIP))
    bmi_drawn = np.clip(rng.normal(spec.bmi_mean, spec.bmi_sd, n), *BMI_CLIP)
    weight = np.round(bmi_drawn * (height / 100.0) ** 2, 1)
    bmi = weight / (height / 100.0) ** 2
    sbp = np.rint(np.clip(
        BP_BASE + spec.bp_offset + BP_AGE * (age - CENTER_AGE) + BP_BMI * (bmi - CENTER_BMI)
        + rng.normal(0.0, BP_SD, n),
        *BP_CLIP,
    ))
    glucose = np.rint(np.clip(glucose_mean(age, bmi) + rng.normal(0.0, GLU_SD, n), *GLU_CLIP))
    hba1c = None
    if spec.hba1c_effect:  # only in that world: every other world draws as before
        hba1c = np.round(np.clip(hba1c_mean(glucose) + rng.normal(0.0, HBA1C_SD, n),
                                 *HBA1C_CLIP), 1)
    logit = true_logit(spec, age, bmi, sbp, glucose, hba1c)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    flipped = rng.random(n) < spec.label_noise
    label = np.where(flipped, 1 - label, label)
    return _Patients(age, height, weight, bmi, sbp, glucose, logit, label, flipped, hba1c)


# Patients drawn to compute a site's best achievable AUC (its population value; the
# standard error of an AUC on 20 000 patients is about 0.003).
BEST_AUC_SAMPLE = 20_000


def best_auc(spec: HospitalSpec, seed: np.random.SeedSequence) -> float:
    """The AUC of the best risk score the site could have (see ``_Patients.best_score``).

    Computed on a large sample of the site's population, against its (noisy) labels: what no
    method can beat on average, whatever it learns. Missing cells are ignored (they only
    lower what is achievable).
    """
    patients = _draw(spec, np.random.default_rng(seed), BEST_AUC_SAMPLE)
    (auc,) = _aucs(patients.label, patients.best_score(spec))
    return float(auc) if auc is not None else math.nan


def true_scores(n_sites: int, seed: int, hba1c: bool = False) -> dict[str, np.ndarray]:
    """Per site, each generated patient's best score (``_Patients.best_score``), in file order.

    The same draws as :func:`generate` with these arguments: row ``i`` of a site's file is
    patient ``i`` here.
    """
    return {
        spec.name: _draw(spec, np.random.default_rng(data_seed), spec.n).best_score(spec)
        for spec, (_, data_seed) in zip(hospital_specs(n_sites, seed, hba1c),
                                        _seeds(n_sites, seed), strict=True)
    }


def _generate_site(spec: HospitalSpec, rng: np.random.Generator) -> _Site:
    """Draw one site's patients and labels and render its CSV text."""
    n = spec.n
    drawn = _draw(spec, rng, n)
    age, height, weight, sbp, glucose = (drawn.age, drawn.height, drawn.weight, drawn.sbp,
                                         drawn.glucose)
    label, flipped, logit = drawn.label, drawn.flipped, drawn.logit
    logit_no_glucose = true_logit(spec, age, drawn.bmi, sbp, glucose_mean(age, drawn.bmi),
                                  drawn.hba1c)

    columns: dict[str, list[str]] = {"age": _format(age, 0), "weight": _format(weight, 1),
                                     "height": _format(height, 0)}
    if spec.has_bp:
        columns["systolic_bp"] = _format(sbp, 0)
    if spec.glucose_measured:
        columns["glucose"] = _format(glucose, 0)
    if spec.hba1c_measured and drawn.hba1c is not None:
        columns["hba1c"] = _format(drawn.hba1c, 1)
    columns[LABEL] = _format(label, 0)

    # Missing at random: each measurable cell is left empty with the site's rate.
    holes = [c for c in ("weight", "height", "systolic_bp", "glucose", "hba1c") if c in columns]
    missing = rng.random((len(holes), n)) < spec.missing_rate
    # Data-entry errors outside the valid range, on at least one row per site.
    n_errors = min(n, max(1, int(rng.binomial(n, spec.error_rate))))
    error_rows = rng.choice(n, size=n_errors, replace=False)
    error_cols = rng.integers(0, len(holes), size=n_errors)
    error_picks = rng.integers(0, 2, size=n_errors)
    for j, col in enumerate(holes):
        cells = columns[col]
        for i in np.flatnonzero(missing[j]).tolist():
            cells[i] = ""
    for row, j, pick in zip(error_rows.tolist(), error_cols.tolist(), error_picks.tolist(),
                            strict=True):
        missing[j, row] = False
        columns[holes[j]][row] = ERROR_VALUES[holes[j]][pick]

    lines = [",".join(spec.columns)]
    lines.extend(",".join(cells) for cells in zip(*(columns[c] for c in spec.columns),
                                                  strict=True))
    auc_true, auc_no_glucose = _aucs(label, logit, logit_no_glucose)
    return _Site(
        text="\n".join(lines) + "\n",
        best_auc=math.nan,  # set by generate() from a large sample of the population
        n=n,
        prevalence=round(float(label.mean()), 6),
        fraction_flipped=round(float(flipped.mean()), 6),
        auc_true_logit=auc_true,
        auc_without_glucose=auc_no_glucose,
        missing_cells=int(missing.sum()),
        error_cells=n_errors,
    )


def _truth(specs: list[HospitalSpec], sites: list[_Site], seed: int) -> dict[str, Any]:
    return {
        "generator": "fedadapt simulations.generator",
        "seed": seed,
        "n_sites": len(specs),
        "hba1c": any(spec.hba1c_effect for spec in specs),
        "schema": SCHEMA_NAME,
        "model": {
            "logit": (
                "b_site + beta_age*(age-50) + beta_bmi*(bmi-27) "
                "+ (beta_bp + extra_bp_effect)*(systolic_bp-130) + beta_glucose*(glucose-105)"
            ),
            "bmi": "weight / (height/100)^2",
            "betas": {
                "age": BETA_AGE, "bmi": BETA_BMI, "systolic_bp": BETA_BP, "glucose": BETA_GLUCOSE,
            },
            "centers": {
                "age": CENTER_AGE, "bmi": CENTER_BMI, "systolic_bp": CENTER_BP,
                "glucose": CENTER_GLUCOSE,
            },
            "label": "Bernoulli(sigmoid(logit)), then flipped with probability label_noise",
        },
        "glucose_model": {
            "formula": (
                f"round(clip({GLU_BASE:g} + {GLU_BMI:g}*(bmi-27) + {GLU_AGE:g}*(age-50) "
                f"+ N(0, {GLU_SD:g}), {GLU_CLIP[0]:g}, {GLU_CLIP[1]:g}))"
            ),
            "conditional_mean": f"{GLU_BASE:g} + {GLU_BMI:g}*(bmi-27) + {GLU_AGE:g}*(age-50)",
            "intercept": GLU_BASE, "bmi": GLU_BMI, "age": GLU_AGE, "noise_sd": GLU_SD,
            "clip": list(GLU_CLIP),
        },
        "blood_pressure_model": {
            "formula": (
                f"round(clip({BP_BASE:g} + bp_offset + {BP_AGE:g}*(age-50) + {BP_BMI:g}*(bmi-27) "
                f"+ N(0, {BP_SD:g}), {BP_CLIP[0]:g}, {BP_CLIP[1]:g}))"
            ),
            "intercept": BP_BASE, "age": BP_AGE, "bmi": BP_BMI, "noise_sd": BP_SD,
            "clip": list(BP_CLIP),
        },
        "sites": [
            {
                "name": spec.name,
                "spec": asdict(spec),
                "n": site.n,
                "prevalence": site.prevalence,
                "fraction_flipped": site.fraction_flipped,
                "best_auc": round(site.best_auc, 4),
                "auc_true_logit": site.auc_true_logit,
                "auc_without_glucose": site.auc_without_glucose,
                "missing_cells": site.missing_cells,
                "out_of_range_cells": site.error_cells,
            }
            for spec, site in zip(specs, sites, strict=True)
        ],
    }


GENERATED_BY = "written by fedadapt's generator"


def generate(
    out_dir: str | Path, n_sites: int = ROLES, seed: int = 42, force: bool = False,
    hba1c: bool = False,
) -> Path:
    """Write one CSV per site, `sites.toml` and `truth.json` into out_dir; return sites.toml.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write into (created if needed; files of the same names are replaced).
    n_sites : int
        Number of sites; see :func:`hospital_specs`.
    seed : int
        Seed of everything drawn. The same ``(n_sites, seed)`` gives byte-identical files,
        and site k's file does not depend on how many sites follow it.
    force : bool
        Replace files of the same names even if this generator did not write them.
    hba1c : bool
        The world with a second site-only feature, HbA1c, with its own effect, measured by
        other sites than glucose (:func:`hospital_specs`).

    Returns
    -------
    Path
        The path of the written ``sites.toml`` manifest.

    Raises
    ------
    ValueError
        If ``n_sites`` is below 1.
    FileExistsError
        If a file it would write exists and was not written by this generator (a patient
        file is never replaced), unless ``force``.
    """
    if n_sites < 1:
        raise ValueError(f"the generator makes at least 1 site, not {n_sites}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = hospital_specs(n_sites, seed, hba1c)
    if not force:
        _refuse_foreign_files(out, [f"{s.name}.csv" for s in specs])
    _remove_stale(out, {f"{s.name}.csv" for s in specs})
    sites: list[_Site] = []
    files: list[str] = []
    for spec, (_, data_seed) in zip(specs, _seeds(n_sites, seed), strict=True):
        site = _generate_site(spec, np.random.default_rng(data_seed))
        site.best_auc = best_auc(spec, data_seed.spawn(1)[0])
        file = f"{spec.name}.csv"
        (out / file).write_text(site.text, encoding="utf-8", newline="")
        sites.append(site)
        files.append(file)
        log.info("site %s: %d rows, prevalence %.3f", spec.name, site.n, site.prevalence)
    manifest = write_manifest(
        out / MANIFEST_NAME, SCHEMA_NAME,
        [{"name": spec.name, "data-file": file, "site-features": list(spec.site_features)}
         for spec, file in zip(specs, files, strict=True)],
        comment=f"{GENERATED_BY} (seed {seed}, {len(specs)} sites)",
    )
    truth = json.dumps(_truth(specs, sites, seed), indent=2, allow_nan=False) + "\n"
    (out / TRUTH_NAME).write_text(truth, encoding="utf-8", newline="")
    log.info("wrote %d sites to %s", len(specs), out)
    return manifest


def _remove_stale(out: Path, files: set[str]) -> None:
    """Remove the hospitals an earlier generation here wrote and this one does not.

    Eight generated hospitals, then four: the other four's files would otherwise stay beside
    the new manifest, as if part of this world. Only files the earlier manifest names as
    generated are removed, never another file.
    """
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        return
    text = manifest.read_text(encoding="utf-8", errors="replace")
    if not text.startswith(f"# {GENERATED_BY}"):
        return
    for line in text.splitlines():
        if line.startswith("data-file"):
            name = line.split("=", 1)[1].strip().strip('"')
            if name not in files and Path(name).name == name:
                (out / name).unlink(missing_ok=True)


def _refuse_foreign_files(out: Path, files: list[str]) -> None:
    """Refuse to replace files in ``out`` that an earlier generation did not write."""
    manifest = out / MANIFEST_NAME
    ours: set[str] = set()
    if manifest.is_file():
        text = manifest.read_text(encoding="utf-8", errors="replace")
        if not text.startswith(f"# {GENERATED_BY}"):
            raise FileExistsError(f"{manifest} exists and was not written by fedadapt "
                                  "generate: choose an empty folder (or pass --force)")
        ours = {MANIFEST_NAME, TRUTH_NAME, *(
            line.split("=", 1)[1].strip().strip('"') for line in text.splitlines()
            if line.startswith("data-file"))}
    for name in [*files, MANIFEST_NAME, TRUTH_NAME]:
        if (out / name).exists() and name not in ours:
            raise FileExistsError(f"{out / name} exists and was not written by fedadapt "
                                  "generate: it is never replaced; choose an empty folder "
                                  "(or pass --force)")
