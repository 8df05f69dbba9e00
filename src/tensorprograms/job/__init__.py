"""The main job and the CLI's report: real data, finite widths vs the limits (see demo.py)."""
