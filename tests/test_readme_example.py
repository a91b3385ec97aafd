"""The README's library example runs as written and every task in it learns."""

import logging
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The python block of the README's section "Using the sparse core in your own code"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the sparse core in your own code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written_and_every_task_learns(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="sparselearning")
    namespace: dict = {"__name__": "__main__"}
    exec(compile(readme_example(), "README.md", "exec"), namespace)

    store, tasks, classes_per_task = namespace["store"], namespace["tasks"], namespace["classes_per_task"]
    assert len(store) == tasks == 3
    for t in range(1, tasks):  # every later task had weights of its own to train
        frozen = store.frozen_before(t)
        assert any(bool((store[t][name] & ~frozen[name]).any()) for name in frozen), f"task {t} trained nothing"
    assert all(accuracy > 100 / classes_per_task + 25 for accuracy in namespace["accuracy"]), namespace["accuracy"]
    assert "NO trainable weights" not in caplog.text and "not isolated" not in caplog.text
    assert caplog.text.count("masking 2 layers") == tasks  # the example's logging is visible
    assert (tmp_path / "masks.pt").is_file()


def test_the_same_seed_for_every_task_is_what_the_default_avoids(caplog):
    """What went wrong before: a fixed seed per task, no update in between -> the second task's
    mask is the first one's, all frozen. Masking now says so loudly; the default seed differs."""
    from sparselearning import Masking, TaskMasks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 4, bias=False))
    store = TaskMasks()
    for t in range(2):
        mask = Masking(torch.optim.Adam(model.parameters()), density=0.3, sparse_init="uniform", update_frequency=0,
                       total_steps=10, frozen=store.frozen_before(t), seed=0)
        mask.add_module(model)
        store.add(mask.consolidate())
    assert "NO trainable weights" in caplog.text
    assert all(torch.equal(store[0][name], store[1][name]) for name in store[0])

    caplog.clear()
    defaults = [Masking(torch.optim.Adam(model.parameters()), density=0.3, total_steps=10) for _ in range(2)]
    assert defaults[0].seed != defaults[1].seed
    torch.manual_seed(5)
    first = Masking(torch.optim.Adam(model.parameters()), density=0.3, total_steps=10).seed
    torch.manual_seed(5)
    assert Masking(torch.optim.Adam(model.parameters()), density=0.3, total_steps=10).seed == first
