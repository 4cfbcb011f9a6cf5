"""Benchmarks: S-LoRA-style workloads against the engine and its peers, with JSON reports."""
