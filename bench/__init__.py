"""Benchmarks: each compares dallecli against a plain-diffusers baseline in the same run and prints ratios."""
