"""Offline analysis that sites never load: evaluation protocol, image metrics, privacy audit, prior pretraining."""
