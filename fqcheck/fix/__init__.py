"""Fixing: findings carry edits; the planner merges them per file; the writer applies them crash-safely."""
