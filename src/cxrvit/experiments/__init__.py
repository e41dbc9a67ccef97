"""Experiments: strategies ("arms") trained and scored side by side on the same patients (issue 21)."""
