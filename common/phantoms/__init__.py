"""The public B-mode phantom simulator, its scanner profiles and fetal biometry (GA <-> head size)."""
