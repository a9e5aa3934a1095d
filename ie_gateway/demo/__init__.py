"""The newcomer's demo: synthetic thorax phantoms with exact labels, and `ie-gateway demo`."""
