"""A progress bar for a run, fed by the ServerApp's events."""

from __future__ import annotations

from typing import Any

from fedadapt.console import console


class RunProgress:
    """Show phases and rounds as the ServerApp reports them (``OUT/events.jsonl``).

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

    def __enter__(self) -> RunProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def update(self, event: dict[str, Any]) -> None:
        """Advance the bar for one ServerApp event."""
        kind = event.get("event")
        rep = f"repeat {event.get('repeat', 0) + 1}/{event.get('repeats', 1)}"
        if kind == "waiting":
            self.bar.update(self.task, description="waiting for sites")
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
