"""The serving stack: scheduler, prefix cache, tiers, HTTP (issue: serve/)."""
