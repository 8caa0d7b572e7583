"""How a command ends on an error: fedadapt's own and the system's in one line, bugs traced."""

from __future__ import annotations

import pytest
import typer

from client.correction_store import CorrectionRefused
from fedadapt.console import user_command
from shared.errors import FedadaptError


class _NewError(FedadaptError, ValueError):
    """An error fedadapt may add later: being a FedadaptError is all it takes."""


def _command(err: BaseException) -> None:
    @user_command
    def command() -> None:
        raise err

    command()


@pytest.mark.parametrize(("err", "line"), [
    (_NewError("site.csv:3:2: not a number"), "site.csv:3:2: not a number"),
    (CorrectionRefused("tampered", "the file was modified"),
     "the site's correction was refused (tampered): the file was modified"),
    (FileNotFoundError(2, "No such file or directory", "x.csv"),
     "x.csv: No such file or directory"),
])
def test_fedadapt_s_errors_and_the_system_s_end_the_command_with_one_line(
    err: BaseException, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``error: <message>`` on stderr, exit code 1, no trace."""
    with pytest.raises(typer.Exit) as ended:
        _command(err)
    assert ended.value.exit_code == 1
    assert capsys.readouterr().err == f"error: {line}\n"


def test_any_other_exception_is_a_bug_and_keeps_its_trace() -> None:
    """A plain ValueError is not a user's mistake: it is not turned into one line."""
    with pytest.raises(ValueError, match="bug"):
        _command(ValueError("bug"))


def test_a_finished_runs_progress_bar_leaves_no_line_a_stopped_ones_stays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run done early (converged, pooled) must not read as stopped at 10/34."""
    import io

    from rich.console import Console

    import fedadapt.progress as progress

    for failed in (False, True):
        out = io.StringIO()
        monkeypatch.setattr(progress, "console", Console(file=out, width=100))
        try:
            with progress.RunProgress(1, 30) as bar:
                bar.update({"event": "phase", "phase": "stats"})
                bar.update({"event": "round", "round": 1, "rounds": 30, "loss": 0.5})
                if failed:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        assert ("round 1/30" in out.getvalue()) is failed
