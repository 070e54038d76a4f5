"""The `trainer` job (issue 3)."""
