"""The local-only baseline: what a site gets from its own patients alone, without the federation."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature

log = logging.getLogger(__name__)

LOCAL_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def fit_predict_local(
    train_rows: pd.DataFrame,
    y_train: np.ndarray,
    test_rows: pd.DataFrame,
    features: Sequence[Feature],
    *,
    folds: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Fit a penalised logistic regression on the site's training rows; return held-out risks.

    The site-local preprocessing (imputation, scaling, one-hot, indicators) is fitted on the
    training rows; the penalty is chosen by stratified cross-validation on them (log-loss).

    Parameters
    ----------
    train_rows, test_rows : pandas.DataFrame
        Training and held-out rows (shared and site features).
    y_train : numpy.ndarray
        Training labels.
    features : sequence of Feature
        Definitions of the columns.
    folds : int
        Folds of the cross-validation (reduced when a class is small).
    seed : int
        Seed of the folds.

    Returns
    -------
    numpy.ndarray
        Predicted risks of the held-out rows. With a single class (or fewer than two rows of
        one), the training prevalence for every row: the best a site alone can do.
    """
    y_train = np.asarray(y_train, dtype=int)
    minority = int(min(y_train.sum(), len(y_train) - y_train.sum()))
    k = min(folds, minority)
    if k < 2:
        log.info("local-only model: a class has %d training row(s); predicting prevalence",
                 minority)
        return np.full(len(test_rows), float(np.clip(y_train.mean(), 0.01, 0.99)))
    prep = TabularPreprocessor(features=list(features)).fit(train_rows)
    model = LogisticRegressionCV(
        Cs=list(LOCAL_CS),
        cv=StratifiedKFold(n_splits=k, shuffle=True, random_state=seed),
        scoring="neg_log_loss",
        max_iter=5000,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 API transition notices
        model.fit(prep.transform(train_rows), y_train)
    return np.asarray(model.predict_proba(prep.transform(test_rows))[:, 1], dtype=float)
