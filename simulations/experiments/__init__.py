"""Experiments that read run folders (downstream protocol, privacy-utility curve)."""
