"""Independent reference implementations for tests and benchmarks (written from the published
descriptions, not from imer_fast's kernels): baselines to compare against, never fast paths."""
