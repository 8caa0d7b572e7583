"""A progress bar for a run, fed by the ServerApp's events."""

from __future__ import annotations

from typing import Any

from fedadapt.console import console, say


class RunProgress:
    """Show phases and rounds as the ServerApp reports them (``OUT/events.jsonl``).

    The bar appears with the run's first event (a refusal before the run prints no bar).
    A resumed run starts where its checkpoint was, and says so.

    Parameters
    ----------
    repeats, rounds : int
        The run's repeats and training rounds.
    pooled : bool
        Whether the pooled reference follows the run (simulation only).
    """

    def __init__(self, repeats: int, rounds: int, pooled: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.rounds = rounds
        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=console)
        # Per repeat: stats, the rounds, adapt, evaluate; then the pooled reference.
        self.task = self.bar.add_task("starting Flower",
                                      total=repeats * (rounds + 3) + int(pooled))
        self.started = False

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self.started:
            # A finished run's bar goes: a pooled reference or a Newton run that converged
            # early would leave it short of its total, as if stopped. A stopped or failed
            # run's bar stays, to show where it was.
            self.bar.live.transient = kind is None
            self.bar.__exit__(None, None, None)

    def update(self, event: dict[str, Any]) -> None:
        """Advance the bar for one ServerApp event."""
        if not self.started:
            self.bar.__enter__()
            self.started = True
        kind = event.get("event")
        rep = f"repeat {event.get('repeat', 0) + 1}/{event.get('repeats', 1)}"
        if kind == "waiting":
            self.bar.update(self.task, description="waiting for sites")
        elif kind == "resumed":
            done = int(event.get("repeat", 0)) * (self.rounds + 3) + int(event.get("round", 0))
            self.bar.update(self.task, completed=done)
            say(f"resuming from the checkpoint: {event.get('repeat', 0)} repeat(s) done, "
                f"{event.get('round', 0)} round(s) of the next")
        elif kind == "checkpoint-ignored":
            say(("note: ", "yellow"), f"the checkpoint {event.get('path')} is "
                f"{event.get('reason')}: this run starts afresh and replaces it")
        elif kind == "phase":
            phase = event["phase"]
            if phase != "train":
                self.bar.advance(self.task)
            self.bar.update(self.task, description=f"{rep}: {phase}")
        elif kind == "round":
            loss = event.get("loss")
            text = f" loss {loss:.4f}" if isinstance(loss, float) else ""
            self.bar.advance(self.task)
            self.bar.update(self.task, description=(
                f"{rep}: round {event['round']}/{event['rounds']}{text}"))
        elif kind == "pooled":
            self.bar.advance(self.task)
            self.bar.update(self.task, description="pooled reference")
