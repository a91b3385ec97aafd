"""The accuracy-matrix metrics on small hand-computed matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from utils.metrics import (
    accuracy_matrix,
    average_bwt,
    average_forgetting,
    average_fwt,
    bwt_per_task,
    chance_accuracy,
    final_accuracy,
    format_report,
    forgetting,
    fwt_above_chance,
    fwt_per_task,
    incremental_accuracy,
    summarize,
)

# Rows: after training task i; columns: task j. Upper triangle = forward-transfer probes.
A3 = np.array(
    [
        [80.0, 10.0, 20.0],
        [70.0, 90.0, 30.0],
        [60.0, 85.0, 75.0],
    ]
)
# By hand:
#   bwt   = [0, 70-80, ((60-80) + (85-90)) / 2]          = [0, -10, -12.5]
#   fwt   = [(10+20)/2, 30, 0]                             = [15, 30, 0];  average (15+30)/2 = 22.5
#   acc   = (60+85+75)/3                                   = 73.333...
#   inc   = [80, (70+90)/2, (60+85+75)/3]                  = [80, 80, 73.333...]
#   forg. = [max(80,70)-60, 90-85]                         = [20, 5];      average 12.5
# With 4 classes a task (chance 25 %), GEM's FWT with chance for the untrained network:
#   next-task probes A[0, 1], A[1, 2] = 10, 30  ->  ((10-25) + (30-25)) / 2 = -5
#   (not the authors' average minus chance, 22.5 - 25 = -2.5: they average every later task)


def test_bwt_per_task_by_hand() -> None:
    np.testing.assert_allclose(bwt_per_task(A3), [0.0, -10.0, -12.5])
    assert average_bwt(A3) == -12.5


def test_fwt_per_task_by_hand() -> None:
    np.testing.assert_allclose(fwt_per_task(A3), [15.0, 30.0, 0.0])
    assert average_fwt(A3) == 22.5


def test_final_accuracy_is_mean_of_last_row() -> None:
    assert final_accuracy(A3) == pytest.approx(220.0 / 3)


def test_incremental_accuracy_uses_the_row_measured_after_each_task() -> None:
    np.testing.assert_allclose(incremental_accuracy(A3), [80.0, 80.0, 220.0 / 3])
    # The authors' variant would use the final row: mean(A[2, :1]) = 60, not 80.
    assert incremental_accuracy(A3)[0] != A3[-1, 0]


def test_forgetting_by_hand() -> None:
    np.testing.assert_allclose(forgetting(A3), [20.0, 5.0])
    assert average_forgetting(A3) == 12.5


def test_forgetting_takes_the_best_earlier_row_and_ignores_probes() -> None:
    A = np.array(
        [
            [50.0, 99.0, 99.0, 99.0],  # probes above the diagonal are higher than anything
            [65.0, 70.0, 99.0, 99.0],
            [55.0, 72.0, 40.0, 99.0],
            [45.0, 60.0, 41.0, 30.0],
        ]
    )
    # task 0: best of 50, 65, 55 is 65 -> 65-45; task 1: best of 70, 72 -> 72-60;
    # task 2: only 40 -> 40-41 = -1 (it improved)
    np.testing.assert_allclose(forgetting(A), [20.0, 12.0, -1.0])
    assert average_forgetting(A) == pytest.approx(31.0 / 3)


def test_four_tasks_bwt_and_fwt() -> None:
    A = np.array(
        [
            [90.0, 20.0, 30.0, 40.0],
            [88.0, 80.0, 50.0, 60.0],
            [86.0, 78.0, 70.0, 10.0],
            [84.0, 76.0, 66.0, 60.0],
        ]
    )
    # bwt[3] = ((84-90) + (76-80) + (66-70)) / 3 = -14/3
    np.testing.assert_allclose(bwt_per_task(A), [0.0, -2.0, -3.0, -14.0 / 3])
    # fwt = [(20+30+40)/3, (50+60)/2, 10, 0]; average (30+55+10)/3
    np.testing.assert_allclose(fwt_per_task(A), [30.0, 55.0, 10.0, 0.0])
    assert average_fwt(A) == pytest.approx(95.0 / 3)


def test_constant_columns_give_exactly_zero_bwt_and_forgetting() -> None:
    """Parameter isolation: a task's accuracy never changes after it was learned."""
    diagonal = np.array([71.3, 64.9, 80.1, 55.55])
    A = np.tril(np.tile(diagonal, (4, 1))) + np.triu(np.full((4, 4), 7.7), k=1)
    assert np.all(bwt_per_task(A) == 0.0)
    assert average_bwt(A) == 0.0
    assert np.all(forgetting(A) == 0.0)
    assert average_forgetting(A) == 0.0
    assert "Average BWT:\n 0.00\n" in format_report(A)
    # ... and then the standard and the authors' incremental accuracy coincide
    authors = [A[-1, : i + 1].mean() for i in range(4)]
    np.testing.assert_allclose(incremental_accuracy(A), authors)


def test_single_task() -> None:
    A = [[55.5]]
    assert bwt_per_task(A).tolist() == [0.0]
    assert fwt_per_task(A).tolist() == [0.0]
    assert average_bwt(A) == 0.0
    assert average_fwt(A) == 0.0
    assert final_accuracy(A) == 55.5
    assert incremental_accuracy(A).tolist() == [55.5]
    assert forgetting(A).size == 0
    assert average_forgetting(A) == 0.0


# ---------------------------------------------------------------- NaN handling


def test_nan_probes_are_left_out_of_the_fwt_means() -> None:
    A = A3.copy()
    A[0, 2] = np.nan
    np.testing.assert_allclose(fwt_per_task(A), [10.0, 30.0, 0.0])
    assert average_fwt(A) == 20.0
    # nothing else looks at the upper triangle
    np.testing.assert_allclose(bwt_per_task(A), bwt_per_task(A3))
    np.testing.assert_allclose(forgetting(A), forgetting(A3))
    np.testing.assert_allclose(incremental_accuracy(A), incremental_accuracy(A3))


def test_a_row_without_probes_is_nan_and_left_out_of_the_average() -> None:
    A = A3.copy()
    A[0, 1:] = np.nan
    fwt = fwt_per_task(A)
    assert math.isnan(fwt[0])
    assert fwt[1:].tolist() == [30.0, 0.0]
    assert average_fwt(A) == 30.0


def test_probes_disabled_entirely() -> None:
    A = np.tril(A3) + np.triu(np.full((3, 3), np.nan), k=1)
    assert math.isnan(average_fwt(A))
    summary = summarize(A)
    assert summary["fwt"] is None
    assert summary["fwt_per_task"] == [None, None, 0.0]
    assert summary["bwt"] == -12.5
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN anywhere
    report = format_report(A)
    assert "Average FWT:\n -\n" in report
    assert report.splitlines()[1].split() == ["80.00", "-", "-"]


@pytest.mark.parametrize(("i", "j"), [(0, 0), (2, 2), (1, 0), (2, 1)])
def test_missing_lower_triangle_or_diagonal_is_an_error(i: int, j: int) -> None:
    A = A3.copy()
    A[i, j] = np.nan
    for metric in (bwt_per_task, fwt_per_task, final_accuracy, incremental_accuracy,
                   forgetting, summarize, format_report):
        with pytest.raises(ValueError, match=rf"A\[{i}, {j}\]"):
            metric(A)


@pytest.mark.parametrize("shape", [(2, 3), (3,), (0, 0)])
def test_matrix_must_be_square_and_non_empty(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="square"):
        accuracy_matrix(np.zeros(shape))


def test_metrics_do_not_modify_the_input() -> None:
    A = A3.copy()
    summarize(A)
    format_report(A)
    np.testing.assert_array_equal(A, A3)


# ---------------------------------------------------------------- summary and report


def test_summarize_is_json_ready_and_matches_the_functions() -> None:
    summary = summarize(A3, classes_per_task=4)
    assert set(summary) >= {"acc", "bwt", "bwt_per_task", "fwt", "fwt_per_task", "fwt_above_chance", "inc_acc",
                            "forgetting"}
    assert summary["acc"] == pytest.approx(220.0 / 3)
    assert summary["bwt"] == -12.5
    assert summary["bwt_per_task"] == [0.0, -10.0, -12.5]
    assert summary["fwt"] == 22.5
    assert summary["fwt_per_task"] == [15.0, 30.0, 0.0]
    assert summary["fwt_above_chance"] == -5.0
    assert summary["inc_acc"] == pytest.approx([80.0, 80.0, 220.0 / 3])
    assert summary["forgetting"] == 12.5
    assert summary["forgetting_per_task"] == [20.0, 5.0]
    for value in summary.values():
        items = value if isinstance(value, list) else [value]
        assert all(type(item) is float for item in items)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_format_report_has_the_authors_headings_in_order() -> None:
    report = format_report(A3)
    headings = ["ACCURACY MATRIX:\n", "INCREMENTAL ACCURACY:\n", "BWT:\n", "FWT:\n",
                "Average BWT:\n", "Average FWT:\n", "ACC (mean of final row): "]
    positions = [report.index(heading) for heading in headings]
    assert positions == sorted(positions)
    # "BWT:" must be its own heading, not only the tail of "Average BWT:"
    assert "\nBWT:\n" in report and "\nFWT:\n" in report
    assert report.splitlines()[-1] == "ACC (mean of final row): 73.33"


def test_format_report_values() -> None:
    report = format_report(A3)
    lines = report.splitlines()
    matrix_lines = lines[1:4]
    assert [line.split() for line in matrix_lines] == [
        ["80.00", "10.00", "20.00"],
        ["70.00", "90.00", "30.00"],
        ["60.00", "85.00", "75.00"],
    ]
    assert len({len(line) for line in matrix_lines}) == 1  # rows aligned
    assert "INCREMENTAL ACCURACY:\n  80.00   80.00   73.33\n" in report
    assert "BWT:\n   0.00  -10.00  -12.50\n" in report
    assert "FWT:\n  15.00   30.00    0.00\n" in report
    assert "Average BWT:\n -12.50\n" in report
    assert "Average FWT:\n 22.50\n" in report


def test_format_report_aligns_columns_of_different_widths() -> None:
    A = np.array([[100.0, np.nan], [5.0, 9.25]])
    lines = format_report(A).splitlines()[1:3]
    assert lines[0].endswith("-")
    assert len(lines[0]) == len(lines[1])
    # each column's last character lines up
    assert lines[0].index("100.00") + len("100.00") == lines[1].index("5.00") + len("5.00")


# ---------------------------------------------------------------- FWT: the authors' probe and above chance


def test_chance_is_100_over_the_classes_of_a_task() -> None:
    assert chance_accuracy(5) == 20.0
    assert chance_accuracy(1) == 100.0
    with pytest.raises(ValueError, match="classes_per_task"):
        chance_accuracy(0)


def test_fwt_above_chance_by_hand() -> None:
    assert fwt_above_chance(A3, 4) == -5.0
    assert fwt_above_chance(A3, 10) == 10.0  # ((10-10) + (30-10)) / 2
    assert average_fwt(A3) == 22.5  # the authors' figure is unchanged


def test_fwt_above_chance_leaves_out_unmeasured_probes_and_needs_a_next_task() -> None:
    A = A3.copy()
    A[0, 1] = np.nan
    assert fwt_above_chance(A, 4) == 5.0  # only A[1, 2] = 30 is left
    A[1, 2] = np.nan
    assert math.isnan(fwt_above_chance(A, 4))  # A[0, 2] is no next-task probe
    assert math.isnan(fwt_above_chance([[55.5]], 4))
    assert summarize([[55.5]], 4)["fwt_above_chance"] is None
    assert summarize([[55.5]], 4)["fwt"] == 0.0  # the authors' convention for one task


def test_summarize_without_the_split_has_no_fwt_above_chance() -> None:
    summary = summarize(A3)
    assert summary["fwt_above_chance"] is None
    assert {key: value for key, value in summary.items() if key != "fwt_above_chance"} == {
        key: value for key, value in summarize(A3, 4).items() if key != "fwt_above_chance"}


def test_format_report_says_what_the_fwt_is_and_gives_it_above_chance() -> None:
    report = format_report(A3, classes_per_task=4)
    meaning = ("Average FWT:\n 22.50\n (authors' probe: accuracy on tasks not yet trained, their labels mapped onto "
               "the trained task's classes, chance 25.00 %; not a transfer difference)\n")
    assert meaning in report
    above = report.split("FWT above chance (", 1)[1]
    assert above.startswith("GEM's FWT, Lopez-Paz & Ranzato 2017,")
    assert "):\n -5.00\n\nACC (mean of final row): 73.33" in above
    assert report.index("Average FWT:") < report.index("FWT above chance") < report.index("ACC (mean")


def test_format_report_without_the_split_says_what_the_fwt_is_without_chance() -> None:
    report = format_report(A3)
    assert ("Average FWT:\n 22.50\n (authors' probe: accuracy on tasks not yet trained, their labels mapped onto "
            "the trained task's classes; not a transfer difference)\n") in report
    assert "chance" not in report
