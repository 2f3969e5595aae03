"""Foundations every other package builds on: run config, errors, records, seeding, provenance, atomic I/O, the
run-folder layout, figures."""
