"""Speculators behind one interface and the lossless verify rule (issue: speculative decoding)."""
