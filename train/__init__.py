"""Drafter training scripts (issue: train/)."""
