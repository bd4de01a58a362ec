"""A notebook's readings of its own results: each claim written once, beside the check of the numbers it rests on.

``reading`` shows the text (its ``{fields}`` filled from this run's numbers) and marks each claim as this run found
it; the notebook saves ``recorded()`` in its metrics.json, and one test requires every claim to hold on ``tiny``.
"""

from __future__ import annotations

_recorded: dict[str, bool | None] = {}  # this kernel's claims, in the order the notebook made them


def within(value: float, best: float, tolerance: float = 0.03) -> bool:
    """``value`` is at most ``best`` up to a relative ``tolerance``: "ends lowest" when two results touch."""
    return value <= best * (1 + tolerance) if best >= 0 else value <= best * (1 - tolerance)


def reading(text: str, checks: dict[str, bool | None], **numbers) -> None:
    """Show ``text`` as Markdown with ``numbers`` filled in, then one line per claim in ``checks`` (claim: whether
    this run's numbers bear it out; ``None``: the claim is about another profile's world, not checked here)."""
    from IPython.display import Markdown, display  # the notebooks' kernel has it (the notebooks extra; Colab)

    _recorded.update(_verdicts(checks))
    display(Markdown(render(text, checks, **numbers)))


def render(text: str, checks: dict[str, bool | None], **numbers) -> str:
    """The Markdown ``reading`` shows."""
    marks = {None: "○", True: "✓", False: "✗"}
    notes = {None: " (not checked on this profile)", True: "",
             False: ": **this run disagrees**; believe the numbers above, not the text"}
    lines = [f"- {marks[v]} {claim}{notes[v]}" for claim, v in _verdicts(checks).items()]
    return "\n".join([text.strip().format(**numbers), "", *lines])


def _verdicts(checks: dict) -> dict[str, bool | None]:
    """Each check as ``True``/``False`` (numpy booleans included), ``None`` left as not checked."""
    return {claim: None if holds is None else bool(holds) for claim, holds in checks.items()}


def recorded() -> dict[str, bool | None]:
    """Every claim this kernel checked, ``None`` where it did not apply: the ``claims`` entry of metrics.json."""
    return dict(_recorded)


def failed(claims: dict[str, bool | None]) -> list[str]:
    """The claims that a run's numbers contradict (``None``, not checked, is not a failure)."""
    return [claim for claim, holds in claims.items() if holds is False]
