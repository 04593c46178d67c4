"""Batched generation on one model: sequences, their cache, sampling and text."""
