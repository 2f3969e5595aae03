"""Diffusion math apart from the network: the training loss, the noise schedules (diffusers) and sampling."""
