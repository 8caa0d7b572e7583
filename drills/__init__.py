"""Reliability drills: faults and bad input, run for real, each with its expected outcome."""
