"""Speed and memory of this code against baselines, measured side by side in one process.

`python -m benchmarks` runs them all on the paper's 10-task CIFAR-100 setting (ResNet-18,
density 0.2 ERK, batch 64), reading the images with the project's own reader, and prints one
table (measurement, ours, baseline, ratio, target, pass/fail); `--json PATH` writes the figures.
One module per family:

- data_pipeline: augmented training batches/s of our TensorLoader vs a torchvision PIL pipeline
  through a DataLoader with 2 workers (`data_speedup`);
- step: masked DST training step vs the dense step (`step_overhead`);
- topology: one prune-and-grow per growth mode vs a sort-based update (`topology_ms`);
- loop: a real train_task epoch vs bare dense steps (`epoch_overhead`) and a real accuracy row
  vs the bare forward pass (`eval_overhead`);
- memory: bytes per task in the checkpoint (`mask_bytes_per_task`) and resident memory per
  task of the mask store (`rss_growth_per_task_mb`);
- checkpoint: one save of the task in progress and its share of wall time (`checkpoint_overhead`);
- syncs: host-device synchronisations per training step and per topology update (CUDA only);
- run: the paper's 10-task command through `utils.experiment.run` (2 epochs a task), training
  images/s vs bare dense steps (`run_overhead`);
- concurrent: aggregate images/s of K concurrent training processes on one device, and the K
  to recommend (`concurrent_recommended_k`; a `benchmarks.worker` per process).

Every comparison alternates ours and the baseline and takes medians (`timing`), so a busy
machine slows both alike. Targets depend on the device (`report.targets_for`): a 2-core CPU's,
or CUDA's (looser step and epoch ratios, zero syncs a step); `--quick` is a smoke test only.
"""
