"""Evaluation: samplers on fixed noise, comparisons, sample grids."""
