"""Trainable models."""
