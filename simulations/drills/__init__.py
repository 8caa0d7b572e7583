"""Reliability drills: faults and bad input run for real, each with an expected outcome and a figure."""
