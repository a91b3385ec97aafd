"""The CPU study committed under results/cpu-study: its tables and findings are what the code makes
of its runs today, and the README's Results section quotes them as they are."""

import json
import re
from pathlib import Path

import pytest

from utils import findings, report

ROOT = Path(__file__).resolve().parents[1]
STUDY = Path("results") / "cpu-study"  # relative, as the committed report names its runs


@pytest.fixture(scope="module")
def runs():
    assert (ROOT / STUDY / "study.json").is_file(), "the committed study is missing"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        yield report.find_runs(STUDY)


def test_the_study_is_complete_and_every_run_in_it_finished(runs):
    record = json.loads((ROOT / STUDY / "study.json").read_text())
    assert record["complete"] is True and record["preset"] == "cpu"
    assert len(runs) == 156
    assert {run.status for run in runs} == {"complete"}


def test_the_committed_csv_and_findings_are_what_the_runs_give_today(runs):
    assert report.to_csv(runs) == (ROOT / STUDY / "report.csv").read_text()
    assert json.loads(json.dumps(findings.analyze(runs))) == json.loads((ROOT / STUDY / "findings.json").read_text())


def test_the_committed_report_tables_are_what_the_runs_give_today(runs):
    text = (ROOT / STUDY / "report.md").read_text()
    for table in report.build_tables(runs):
        assert report.markdown_table(table) in text
        assert report.markdown_table(table, "acc_agnostic", "bwt_agnostic") in text
        assert report.markdown_table(table, report.CAPACITY, None) in text
        assert report.flops_table(table) in text


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def results_section() -> str:
    return readme_section("Results")


QUOTING = {"Results": 21, "Other approaches on the same backbone (WSN, PackNet, SupSup)": 16,
           "Adaptive DST (beyond the paper)": 9}
"""The README's sections that quote the study, and how many of its table rows each quotes."""


@pytest.mark.parametrize("title", QUOTING)
def test_every_row_the_readme_quotes_from_the_study_is_in_its_report_or_findings(title):
    """A table row of a README section quoting the study with a measured cell, "(n=3)", appears in
    the committed report or findings: the README's numbers are not typed by hand."""
    committed = (ROOT / STUDY / "report.md").read_text() + (ROOT / STUDY / "findings.md").read_text()
    rows = [line for line in readme_section(title).splitlines() if line.startswith("|") and "(n=" in line]
    assert len(rows) == QUOTING[title]
    for row in rows:
        assert row in committed, row


def test_the_readme_shows_the_study_figures_that_exist():
    figures = re.findall(r"\]\((results/cpu-study/figures/[^)]+\.png)\)", results_section())
    assert len(figures) >= 2
    for figure in figures:
        assert (ROOT / figure).is_file(), figure
