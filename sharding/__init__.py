"""Meshes, logical-axis rules and communication-overlapped collectives (issue: sharding)."""
