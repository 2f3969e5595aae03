"""The coordinator's loop: sample scoring, acquisition, the site query, and the release store."""
