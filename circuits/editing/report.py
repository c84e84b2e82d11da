"""The record of an edit (what ``edits.json`` holds) and its report (``report.md``).

The record says what was done and to what: the method, its layers and options, each edit with
its paraphrases, neighbours and old target, the source model (name, folder, fingerprint), the
circuits version, the norm of each weight change, and the evaluation before and after
(`circuits.editing.evaluate.EditEvaluation`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from circuits.editing.evaluate import EditEvaluation
from circuits.editing.score import FactEdit
from circuits.version import __version__

__all__ = ["FORMAT", "edit_record", "report_markdown"]

FORMAT = "circuits-edits/1"


def edit_record(source: Mapping[str, Any], method: str, layers: Sequence[int],
                cases: Sequence[FactEdit], norms: Sequence[Mapping[str, Any]],
                evaluation: EditEvaluation, options: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON record of an edit.

    Parameters
    ----------
    source : mapping
        The model edited: ``name``, ``path`` (its folder, or None for a hub name) and
        ``fingerprint`` (`circuits.model.Model.fingerprint`).
    method : str
        ``rome`` or ``memit``.
    layers : sequence of int
    cases : sequence of FactEdit
    norms : sequence of mapping
        ``{"edit": number or "all", "param": name, "norm": float}`` per weight change.
    evaluation : EditEvaluation
    options : mapping
        The method's options (value optimisation, MEMIT's weight, the key-statistics sample).

    Examples
    --------
    >>> from circuits.editing.evaluate import Snapshot, EditScore
    >>> from circuits.editing.edit_files import parse_fact
    >>> s = Snapshot((EditScore(False, 0.1, None, None),), 1.0, 2.0)
    >>> r = edit_record({"name": "m", "path": None, "fingerprint": "v2-x"}, "rome", [1],
    ...                 [parse_fact("A | A is | b")], [], EditEvaluation((), s, s), {})
    >>> r["format"], r["edits"][0]["target"], r["evaluation"]["after"]["efficacy"]
    ('circuits-edits/1', 'b', 0.0)
    """
    return {
        "format": FORMAT,
        "circuits_version": __version__,
        "method": method,
        "layers": list(layers),
        "source": dict(source),
        "edits": [{**asdict(c.edit), "old": c.old, "paraphrases": list(c.paraphrases),
                   "neighbours": list(c.neighbours)} for c in cases],
        "options": dict(options),
        "deltas": [dict(n) for n in norms],
        "evaluation": evaluation.to_dict(),
    }


def report_markdown(record: Mapping[str, Any], evaluation: EditEvaluation, command: str,
                    written: str | None) -> str:
    """The report: what was edited, the averages and each edit before and after.

    Examples
    --------
    >>> from circuits.editing.evaluate import Snapshot, EditScore
    >>> from circuits.editing.edit_files import parse_fact
    >>> s = Snapshot((EditScore(True, 0.9, None, 1.0),), 1.0, 2.0)
    >>> case = parse_fact("A | A is | b")
    >>> e = EditEvaluation((case,), s, s)
    >>> text = report_markdown(edit_record({"name": "m", "path": None, "fingerprint": "f"},
    ...                        "rome", [1], [case], [], e, {}), e, "circuits edit m", None)
    >>> text.splitlines()[0]
    '# ROME edit of m'
    """
    source = record["source"]
    layers = ", ".join(map(str, record["layers"]))
    lines = [f"# {record['method'].upper()} edit of {source['name']}", "",
             f"- command: `{command}`",
             f"- {len(record['edits'])} edit(s) at layer(s) {layers}",
             f"- source fingerprint: `{source['fingerprint']}`",
             f"- edited model: {written or 'not written (dry run)'}", "",
             "## Averages", "", "```", evaluation.summary(), "```", "",
             "## Each edit", "", "```", evaluation.table(), "```", ""]
    return "\n".join(lines)
