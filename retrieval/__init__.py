"""The `retrieval` job (issue 4)."""
