"""The fixer: findings carry edits (edits.py); the planner merges them per file (plan.py); the
writer applies them crash-safely (shard.py, transaction.py, journal.py, recovery.py); runner.py
runs lint, plan, write and re-lint for `fqcheck.fix()` (api.py), the one way in."""
