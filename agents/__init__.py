"""Policies that drive the engine: heuristic baselines of the field and (later) learned ones."""
