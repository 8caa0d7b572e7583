"""DP accounting shared by both sides: nothing pays Opacus' import until an epsilon is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_opacus_is_imported_only_when_an_epsilon_is_computed() -> None:
    """The site's and the coordinator's modules load without it; the accountant loads it."""
    code = (
        "import sys\n"
        "import client.client_app, client.privacy, server.phases, server.strategy\n"
        "from shared import dp_accounting\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'opacus'], 'imported'\n"
        "assert dp_accounting.epsilon_spent([(1.0, 1.0, 10)], 1e-5) > 0\n"
        "assert 'opacus' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
