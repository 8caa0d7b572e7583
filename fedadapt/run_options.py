"""The run settings as command-line options, built from their one declaration (``RunSettings``).

Every field of :class:`shared.settings.RunSettings` becomes an option ``--<key>`` with its help,
its default and its allowed values, so the command, ``[tool.flwr.app.config]`` and the
ServerApp cannot drift apart. Values are checked by ``RunSettings.from_run_config``, the same
check the ServerApp makes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import Field
from typing import Annotated, Any

import typer
from rich.markup import escape

from shared.settings import RunSettings, key

# Shorter names kept from earlier versions of the command (README examples use them).
ALIASES = {"num-server-rounds": ("--rounds",)}
PANEL = escape("Run settings (the keys of [tool.flwr.app.config])")
PREFIX = "setting_"


def _help(f: Field[Any], default: Any) -> str:
    choices = f.metadata["choices"]
    allowed = f" One of: {', '.join(choices)}." if choices else ""
    shown = str(default).lower() if isinstance(default, bool) else default
    text = f"{f.metadata['help'][:1].upper()}{f.metadata['help'][1:]}.{allowed}"
    return escape(f"{text} [default: {shown}]")  # typer renders help as rich markup


def _parameter(f: Field[Any], default: Any, panel: str) -> inspect.Parameter:
    name = key(f)
    kind = type(f.default)
    if kind is bool:
        option = typer.Option(f"--{name}/--no-{name}", help=_help(f, default),
                              rich_help_panel=panel, show_default=False)
    else:
        option = typer.Option(f"--{name}", *ALIASES.get(name, ()), help=_help(f, default),
                              rich_help_panel=panel, show_default=False)
    return inspect.Parameter(PREFIX + f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])


def with_run_settings(
    exclude: frozenset[str] = frozenset(), defaults: Mapping[str, Any] | None = None,
    panel: str = PANEL,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per run setting; it receives ``settings`` and ``given``.

    Parameters
    ----------
    exclude : frozenset of str
        Keys the command sets itself (``sites-manifest``, ``out``, ...): no option.
    defaults : mapping, optional
        This command's own defaults for some keys (shown in ``--help``).
    panel : str
        The title of the options' panel in ``--help``.

    Returns
    -------
    callable
        A decorator. The decorated function takes ``settings`` (the checked
        :class:`RunSettings`) and ``given`` (the keys the user set) besides its own options.
    """
    own_defaults = dict(defaults or {})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name not in ("settings", "given")]
        declared = [f for f in RunSettings.declared() if key(f) not in exclude]
        added = [_parameter(f, own_defaults.get(key(f), f.default), panel) for f in declared]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {key(f): kwargs.pop(PREFIX + f.name) for f in declared
                     if kwargs.get(PREFIX + f.name) is not None}
            for f in declared:
                kwargs.pop(PREFIX + f.name, None)
            settings = RunSettings.from_run_config({**own_defaults, **given})
            return fn(settings=settings, given=set(given), **kwargs)

        params = [*kept, *added]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
