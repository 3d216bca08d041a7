"""Tensor parallelism: a model split over several ranks that add their partial results.

sharding.py     which slice of each weight a rank holds; cutting it from a loader's tensor
"""
