"""The accuracy matrix and the continual-learning metrics, each defined once, here.

The primary result of a run is the T x T accuracy matrix ``A`` (percent, T = number of tasks):

- ``A[i, j]`` for ``j <= i`` (lower triangle and diagonal) is the test accuracy on task ``j``
  measured after training task ``i``. These entries must all be present.
- ``A[i, j]`` for ``j > i`` (upper triangle) is the authors' forward-transfer probe: task
  ``j``'s test data evaluated with task ``i``'s network, task ``j``'s labels mapped onto task
  ``i``'s class slots. A probe that was not measured is NaN.

NaN convention: every function ignores NaN in the upper triangle by averaging only the
measured probes (a nan-aware mean); a quantity with no measured probe at all is NaN (``None``
in ``summarize``, ``-`` in ``format_report``). A NaN or infinity in the lower triangle or on
the diagonal is a bug in the caller and raises ``ValueError``.

The BWT, FWT and "Average" definitions reproduce the authors' script exactly, so numbers are
comparable with the paper; ``incremental_accuracy`` and ``forgetting`` follow the standard
definitions (documented on each function).

FWT, two figures. The authors' FWT (``fwt_per_task``, ``average_fwt``; ``fwt`` in results.json)
is an absolute accuracy, not a transfer difference: the probe's accuracy on tasks not yet
trained, to be read against chance, ``100 / classes_per_task`` (``chance_accuracy``). The
standard forward transfer (GEM, Lopez-Paz & Ranzato 2017) is ``mean_{i>=1} (A[i-1, i] - b_i)``
with ``b_i`` the accuracy of a randomly initialised network on task ``i``. No run here measures
``b_i``; its expectation is exactly chance (an untrained classifier treats the task's class slots
alike: every test image is assigned its own class with probability ``1 / classes_per_task``).
``fwt_above_chance`` is GEM's formula with that expectation in place of a measured ``b_i``:
computed exactly from the matrix and the split, it differs from a measured GEM FWT only by the
noise of ``b_i`` around chance. Positive = the previous task's network classifies the next task
better than chance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from utils.chance import NEAR_CHANCE_REASON, chance_percent, near_chance


def accuracy_matrix(A: ArrayLike) -> np.ndarray:
    """``A`` as a float64 T x T array, checked: square, T >= 1, lower triangle complete.

    Returns a new array; the caller's matrix is never modified.
    """
    matrix = np.array(A, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got {matrix.shape}")
    lower = np.tril(np.ones(matrix.shape, dtype=bool))
    if not np.all(np.isfinite(matrix[lower])):
        rows, cols = np.nonzero(lower & ~np.isfinite(matrix))
        raise ValueError(
            "accuracy matrix: lower triangle and diagonal must be measured, "
            f"missing A[{rows[0]}, {cols[0]}]"
        )
    return matrix


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    measured = values[~np.isnan(values)]
    return float(measured.mean()) if measured.size else math.nan


def bwt_per_task(A: ArrayLike) -> np.ndarray:
    """Backward transfer after each task (authors' definition), length T.

    ``bwt[0] = 0`` and, for ``i >= 1``, ``bwt[i] = mean_{j < i} (A[i, j] - A[j, j])``: how much
    the accuracy on the earlier tasks changed between learning them and finishing task ``i``.
    Negative = forgetting. Uses only the lower triangle and the diagonal.
    """
    matrix = accuracy_matrix(A)
    T = matrix.shape[0]
    bwt = np.zeros(T)
    diagonal = np.diag(matrix)
    for i in range(1, T):
        bwt[i] = np.mean(matrix[i, :i] - diagonal[:i])
    return bwt


def average_bwt(A: ArrayLike) -> float:
    """The authors' "Average BWT": ``bwt_per_task(A)[-1]``, the BWT over all tasks at the end.

    (Despite its name it is not a mean over the per-task BWT values.)
    """
    return float(bwt_per_task(A)[-1])


def fwt_per_task(A: ArrayLike) -> np.ndarray:
    """The authors' forward-transfer probe per task, length T.

    ``fwt[i] = mean(A[i, i+1:])`` for ``i < T-1`` (task ``i``'s network on the tasks still to
    come) and ``fwt[T-1] = 0``. NaN probes are ignored; a row with no measured probe gives NaN.
    """
    matrix = accuracy_matrix(A)
    T = matrix.shape[0]
    fwt = np.zeros(T)
    for i in range(T - 1):
        fwt[i] = _nanmean(matrix[i, i + 1 :])
    return fwt


def average_fwt(A: ArrayLike) -> float:
    """The authors' "Average FWT": the mean of ``fwt_per_task(A)[:-1]``; 0.0 when T == 1.

    Rows whose probes were all unmeasured (NaN) are left out of the mean; NaN if none remain.
    """
    fwt = fwt_per_task(A)
    return _nanmean(fwt[:-1]) if fwt.size > 1 else 0.0


def chance_accuracy(classes_per_task: int) -> float:
    """100 / classes_per_task: the expected accuracy (percent) on a task of a network not trained
    on it; what the authors' FWT probe is to be compared with."""
    if classes_per_task < 1:
        raise ValueError(f"classes_per_task must be >= 1, got {classes_per_task}")
    return chance_percent(classes_per_task)  # a uniform pick among the task's classes


def fwt_above_chance(A: ArrayLike, classes_per_task: int) -> float:
    """GEM's forward transfer with chance for the untrained network's accuracy (module docstring).

    ``mean_{i=1}^{T-1} (A[i-1, i] - chance_accuracy(classes_per_task))``: the probe of task
    ``i-1``'s network on the next task ``i`` (the first superdiagonal; the authors' FWT averages
    all later tasks instead), minus chance. Unmeasured probes are left out; NaN when none is
    measured, and when T == 1 (no next task).
    """
    matrix = accuracy_matrix(A)
    chance = chance_accuracy(classes_per_task)
    return _nanmean(np.diag(matrix, k=1) - chance)


def final_accuracy(A: ArrayLike) -> float:
    """ACC: the mean test accuracy over all T tasks after the last task (mean of the final row)."""
    matrix = accuracy_matrix(A)
    return float(matrix[-1].mean())


def incremental_accuracy(A: ArrayLike) -> np.ndarray:
    """Average accuracy on the tasks seen so far, after each task, length T.

    ``inc[i] = mean(A[i, :i+1])``: the standard definition, computed from the row actually
    measured after task ``i``. The authors' script used the final row instead,
    ``mean(A[T-1, :i+1])``; the two coincide whenever nothing is forgotten (column ``j`` of the
    lower triangle constant, BWT = 0, as parameter isolation guarantees), and differ otherwise.
    """
    matrix = accuracy_matrix(A)
    return np.array([matrix[i, : i + 1].mean() for i in range(matrix.shape[0])])


def forgetting(A: ArrayLike) -> np.ndarray:
    """Forgetting of each task but the last, length T-1 (Chaudhry et al. 2018).

    ``f[j] = max_{j <= k <= T-2} A[k, j] - A[T-1, j]``: the drop from the best accuracy task
    ``j`` had at any earlier point after it was learned to its final accuracy. Probe entries
    (``k < j``, the upper triangle) are not accuracies of a learned task and are excluded.
    Zero under parameter isolation; negative if a task improved afterwards.
    """
    matrix = accuracy_matrix(A)
    T = matrix.shape[0]
    return np.array([matrix[j : T - 1, j].max() - matrix[T - 1, j] for j in range(T - 1)])


def average_forgetting(A: ArrayLike) -> float:
    """Mean of ``forgetting(A)`` over the first T-1 tasks; 0.0 when T == 1."""
    values = forgetting(A)
    return float(values.mean()) if values.size else 0.0


def _json_float(value: float) -> float | None:
    """A python float, or None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else float(value)


def _json_list(values: np.ndarray) -> list[float | None]:
    return [_json_float(float(v)) for v in values]


METRIC_KEYS = ("acc", "bwt", "bwt_per_task", "fwt", "fwt_per_task", "fwt_above_chance", "inc_acc", "forgetting",
               "forgetting_per_task")
"""The keys of `summarize`."""


def summarize(A: ArrayLike, classes_per_task: int | None = None) -> dict[str, Any]:
    """All named metrics of ``A`` as a JSON-ready dict (python floats; NaN becomes None).

    Keys: ``acc`` (final_accuracy), ``bwt`` (average_bwt), ``bwt_per_task``, ``fwt``
    (average_fwt: the authors' probe, an accuracy), ``fwt_per_task``, ``fwt_above_chance``
    (fwt_above_chance; None when ``classes_per_task`` is not given), ``inc_acc``
    (incremental_accuracy, a list), ``forgetting`` (average_forgetting) and
    ``forgetting_per_task`` (forgetting, a list).
    """
    matrix = accuracy_matrix(A)
    above = math.nan if classes_per_task is None else fwt_above_chance(matrix, classes_per_task)
    return {
        "acc": _json_float(final_accuracy(matrix)),
        "bwt": _json_float(average_bwt(matrix)),
        "bwt_per_task": _json_list(bwt_per_task(matrix)),
        "fwt": _json_float(average_fwt(matrix)),
        "fwt_per_task": _json_list(fwt_per_task(matrix)),
        "fwt_above_chance": _json_float(above),
        "inc_acc": _json_list(incremental_accuracy(matrix)),
        "forgetting": _json_float(average_forgetting(matrix)),
        "forgetting_per_task": _json_list(forgetting(matrix)),
    }


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _row(values: np.ndarray, width: int) -> str:
    return " " + "  ".join(_cell(float(v)).rjust(width) for v in values)


def fwt_meaning(classes_per_task: int | None = None) -> str:
    """What the authors' FWT is, in words, with chance when the split is known."""
    chance = "" if classes_per_task is None else f", chance {chance_accuracy(classes_per_task):.2f} %"
    return ("authors' probe: accuracy on tasks not yet trained, their labels mapped onto the trained task's "
            f"classes{chance}; not a transfer difference")


def fwt_above_chance_meaning(classes_per_task: int) -> str:
    """What `fwt_above_chance` is, in words."""
    return (f"GEM's FWT, Lopez-Paz & Ranzato 2017, with chance for an untrained network's accuracy: "
            f"each task's probe on the next task minus {chance_accuracy(classes_per_task):.2f} %, averaged")


def format_report(A: ArrayLike, classes_per_task: int | None = None) -> str:
    """The text the authors' script prints, with the same headings in the same order.

    ACCURACY MATRIX, INCREMENTAL ACCURACY, BWT, FWT, Average BWT, Average FWT, each heading on
    its own line followed by its values, then a last line ``ACC (mean of final row): x.xx``.
    Numbers have 2 decimals, matrix columns are right-aligned, unmeasured entries show as ``-``.
    The text has no trailing newline. Added to the authors' text: a line after the Average FWT
    saying what it is (`fwt_meaning`) and, when ``classes_per_task`` is given, a section
    ``FWT above chance (...)`` (`fwt_above_chance`) before the last line.
    """
    matrix = accuracy_matrix(A)
    vectors = {
        "INCREMENTAL ACCURACY": incremental_accuracy(matrix),
        "BWT": bwt_per_task(matrix),
        "FWT": fwt_per_task(matrix),
    }
    width = max(len(_cell(float(v))) for v in np.concatenate([matrix.ravel(), *vectors.values()]))
    sections = ["ACCURACY MATRIX:\n" + "\n".join(_row(row, width) for row in matrix)]
    sections += [f"{heading}:\n" + _row(values, width) for heading, values in vectors.items()]
    sections.append(f"Average BWT:\n {_cell(average_bwt(matrix))}")
    sections.append(f"Average FWT:\n {_cell(average_fwt(matrix))}\n ({fwt_meaning(classes_per_task)})")
    if classes_per_task is not None:
        sections.append(f"FWT above chance ({fwt_above_chance_meaning(classes_per_task)}):\n"
                        f" {_cell(fwt_above_chance(matrix, classes_per_task))}")
    sections.append(f"ACC (mean of final row): {_cell(final_accuracy(matrix))}")
    return "\n\n".join(sections)


# ---- task-agnostic testing (the task id hidden and inferred; utils.task_inference) --------------

AGNOSTIC_KEYS = ("acc_agnostic", "bwt_agnostic", "task_id_accuracy")
"""The task-agnostic figures of `summarize_agnostic`."""


def summarize_agnostic(A: ArrayLike, task_id_accuracy: ArrayLike) -> dict[str, Any]:
    """The task-agnostic figures: ``acc_agnostic`` (final_accuracy of the task-agnostic matrix,
    whose upper triangle is unmeasured), ``bwt_agnostic`` (its average_bwt: with the task id
    hidden, a task's accuracy can drop as more tasks compete for its batches even when its
    network is frozen) and ``task_id_accuracy`` (percent of test batches assigned to their own
    task, one value per row)."""
    matrix = accuracy_matrix(A)
    return {"acc_agnostic": _json_float(final_accuracy(matrix)), "bwt_agnostic": _json_float(average_bwt(matrix)),
            "task_id_accuracy": _json_list(np.asarray(task_id_accuracy, dtype=np.float64))}


def format_agnostic_report(A: ArrayLike, task_id_accuracy: ArrayLike, method: str, test_batch_size: int) -> str:
    """The task-agnostic matrix and figures as text, laid out like `format_report`."""
    matrix = accuracy_matrix(A)
    task_id = np.asarray(task_id_accuracy, dtype=np.float64)
    chance = np.array([chance_percent(i + 1) for i in range(len(task_id))])
    width = max(len(_cell(float(v))) for v in np.concatenate([matrix.ravel(), task_id, chance]))
    return "\n\n".join([
        f"TASK-AGNOSTIC ACCURACY MATRIX (task id inferred: {method}, test batches of {test_batch_size}):\n"
        + "\n".join(_row(row, width) for row in matrix),
        "TASK-ID ACCURACY (% of test batches assigned to their task, per row):\n" + _row(task_id, width)
        + "\nCHANCE (1/(tasks so far), per row):\n" + _row(chance, width)
        + (f"\nLast row {NEAR_CHANCE_REASON}." if near_chance(task_id[-1], len(task_id)) else ""),
        f"Task-agnostic BWT:\n {_cell(average_bwt(matrix))}",
        f"Task-agnostic ACC (mean of final row): {_cell(final_accuracy(matrix))}",
    ])
