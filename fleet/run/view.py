"""What a step's templates see of its run (``{input.X}``, ``{steps.NAME}``, ``{session.transcript}``,
``{loop.transcript}``), built from the run's state."""

from __future__ import annotations

from typing import Any

from fleet.run.agent import LoopStep
from fleet.run.sessions import transcript
from fleet.run.state import RunState
from fleet.run.template import as_text


def template_view(run: RunState, iteration: int = 0, loop: LoopStep | None = None) -> dict[str, Any]:
    """What a step's templates see: ``input``, ``steps`` (latest outputs up to this
    iteration), ``session`` and, inside a loop, ``loop`` (iteration and transcript)."""
    latest: dict[str, Any] = {}
    for name, by_iteration in run.outputs.items():
        if 0 in by_iteration:  # a step outside loops (a parallel step: its joined output)
            latest[name] = by_iteration[0]
            continue
        usable = [i for i in by_iteration if iteration == 0 or i <= iteration]
        if usable:
            latest[name] = by_iteration[max(usable)]
    view: dict[str, Any] = {
        "input": run.input,
        "steps": latest,
        "session": {"id": run.session_id or "", "transcript": transcript(run.fields.get("session", []))},
    }
    if loop is not None:
        lines: list[str] = []
        for it in range(1, iteration):
            for body_step in loop.body:
                label = body_step.transcript_label
                if label and it in run.outputs.get(body_step.name, {}):
                    lines.append(f"{label}: {as_text(run.outputs[body_step.name][it])}")
        view["loop"] = {"iteration": iteration, "transcript": "\n".join(lines)}
    return view
