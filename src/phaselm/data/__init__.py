"""Corpora and tokenised datasets."""
