"""What chance is for task-agnostic testing, and the words that go with a figure near it.

With the task id hidden, a test batch is assigned to one of the tasks trained so far
(`utils.task_inference`); a rule that picks a task at random finds the batch's own task for
1/(tasks so far) of the batches. The log and report.txt print this next to the measured share,
and say why a share near chance is expected rather than a bug. Pure Python: the log, the
metrics and the report all use it.
"""

from __future__ import annotations

NEAR_CHANCE_POINTS = 5.0
"""A task-found share at most this many percentage points above chance is called near chance."""

NEAR_CHANCE_REASON = ("near chance: the tasks' networks are not calibrated against each other (one network, "
                      "often task 1's, can be the most confident on every task's images); see README "
                      "'Testing without the task id'")


def chance_percent(candidates: int) -> float:
    """Percent right of a uniform random pick among `candidates`: tasks for a test batch here
    (`utils.metrics.chance_accuracy` uses it for classes within a task)."""
    return 100.0 / candidates


def near_chance(found: float, candidates: int) -> bool:
    """Whether `found` (percent of batches assigned to their own task) is within NEAR_CHANCE_POINTS of
    chance; never with one candidate, where there is nothing to infer."""
    return candidates > 1 and found <= chance_percent(candidates) + NEAR_CHANCE_POINTS


def found_note(found: float, candidates: int) -> str:
    """'task found for F% of batches (chance: ...)', with the reason when F is near chance."""
    if candidates == 1:
        return f"task found for {found:.1f}% of batches (one task trained: nothing to infer)"
    note = f"chance: task found 1/{candidates} of batches = {chance_percent(candidates):.1f}%"
    if near_chance(found, candidates):
        note += f"; {NEAR_CHANCE_REASON}"
    return f"task found for {found:.1f}% of batches ({note})"
