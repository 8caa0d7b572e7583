"""Fixed answers: a site computes an answer once per question on its own rows, then repeats it.

The stats of a site's training rows depend only on things the site owns (the version of its
data file, its split, its schema and whether it answers under differential privacy), so the
site computes them once, keeps them in ``site-dir/answers/`` (0600), and sends the same
numbers, verbatim, every time they are asked for again: asking twice, or with small changes
the site ignores, learns nothing new, and a noisy release is paid for once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shared.arrays import json_digest
from shared.files import ensure_private_dir, write_atomically

log = logging.getLogger(__name__)

FOLDER = "answers"


def answer_key(**question: Any) -> str:
    """The name of a question: the digest of everything its answer depends on."""
    return json_digest(question)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process computes a given answer at a time (a noisy one is charged once)."""
    ensure_private_dir(folder)
    with (folder / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fixed_answer(site_dir: str | Path, key: str, compute: Callable[[], dict[str, Any]]
                 ) -> tuple[dict[str, Any], bool]:
    """The kept answer to question ``key``, computed by ``compute`` the first time.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    key : str
        The question's name (:func:`answer_key`).
    compute : callable
        Computes the answer (JSON values, no NaN); called at most once per key.

    Returns
    -------
    dict, bool
        The answer, and whether it is a repeat of one sent before.
    """
    folder = Path(site_dir) / FOLDER
    path = folder / f"{key}.json"
    with _locked(folder):
        try:
            answer = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            answer = None
        except ValueError:
            # A damaged answer is not repeated: computing it again could give new numbers
            # (a fresh noisy release); the operator has to look.
            raise OSError(f"the kept answer {path} is damaged: move it away only if it was "
                          "never sent (see the audit log)") from None
        if isinstance(answer, dict):
            log.info("answer %s repeated from %s", key[:12], path)
            return answer, True
        answer = compute()
        write_atomically(path, json.dumps(answer, allow_nan=False).encode("utf-8"), mode=0o600)
    return answer, False
