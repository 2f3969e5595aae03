"""Throughput and speed benchmarks; each writes a JSON report (default folder ``runs/benchmarks/``)."""
