"""Tensor parallelism plumbing: process groups and the ParallelContext passed to parallel layers.

No module-level state: every rank builds one ParallelContext and hands it to whatever needs collectives.
"""
