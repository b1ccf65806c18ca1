"""Tests of deploy/: the rendered overlays' invariants, and the dev overlay booted locally."""
