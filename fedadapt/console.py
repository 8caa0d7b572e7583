"""What the command prints, and how a user's mistake or an interrupt ends it: one line, no trace.

Text that comes from outside the program (file names, header text, messages that quote them)
is printed verbatim: never through rich's markup or emoji substitution (``[/x]`` in a path
would crash, ``file:100:7`` would show an emoji).
"""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from shared.errors import FedadaptError

# When the output is not a terminal (a log, CI), rich would assume 80 columns; the per-site
# table is made for 100.
console = Console(emoji=False, highlight=False,
                  width=None if Console().is_terminal else 100)
err_console = Console(stderr=True, emoji=False, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def say(*parts: str | tuple[str, str], err: bool = False) -> None:
    """Print plain text; ``(text, style)`` pairs are styled, never parsed as markup."""
    # soft_wrap: a message is one line however long (a path, a location), never cut up.
    (err_console if err else console).print(Text.assemble(*parts), soft_wrap=True)


def explain(*parts: str | tuple[str, str], indent: int = 0) -> None:
    """Print plain text wrapped at the console's width (continuation lines indented)."""
    from rich.padding import Padding

    text = Text.assemble(*parts)
    console.print(Padding(text, (0, 0, 0, indent)) if indent else text)


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with ``error: message`` on stderr and exit code ``code``."""
    say(("error: ", "bold red"), message, err=True)
    raise typer.Exit(code)


def _describe(err: BaseException) -> str:
    """The one line that ends a command for ``err``: fedadapt's message, or the system's."""
    from client.correction_store import CorrectionRefused

    if isinstance(err, CorrectionRefused):
        return f"the site's correction was refused ({err.reason}): {err}"
    if (not isinstance(err, FedadaptError) and isinstance(err, OSError) and err.strerror
            and not str(err).startswith(str(err.strerror))):
        # An OSError raised by the system names the file and the reason, not what to do.
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    return str(err)


def user_command(fn: F) -> F:
    """Run a command; a user's mistake ends it with one clear line and exit code 1.

    A user's mistake is an error fedadapt wrote itself (:class:`shared.errors.FedadaptError`,
    whose message says what to do) or one of the system's about a file or a process
    (``OSError``); anything else is a bug in fedadapt, shown with its trace.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FedadaptError, OSError) as err:
            fail(_describe(err))

    return wrapper  # type: ignore[return-value]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """The first Ctrl-C or SIGTERM stops the command; later ones are ignored.

    SIGTERM (``kill``, ``timeout``, systemd, docker) acts like Ctrl-C. Ignoring what follows
    lets the clean-up (bounded in time) finish, so that nothing is left running.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stops_its_processes(
    what: str, checkpoint: Path | None = None, resume: str = ""
) -> Iterator[None]:
    """Inside: Ctrl-C or SIGTERM ends the command with a clear "interrupted" and exit 130.

    The code inside stops the processes it started in its own ``finally`` blocks. When
    ``checkpoint`` holds a saved round afterwards, ``resume`` (how to go on) is said too.
    """
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        saved = resume and checkpoint is not None and (checkpoint / "state.json").exists()
        fail(f"interrupted: {what} was stopped, with every process it started; no report of "
             "this run is left that looks complete" + (f"; {resume}" if saved else ""),
             code=130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
