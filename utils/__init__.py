"""Command line, metrics, run directories and the per-task training loop."""
