"""Differential privacy at one site: the epsilon ledger, DP-SGD with Opacus, and the site's persistent state."""
