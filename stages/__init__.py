"""Thin typer commands, one per DVC stage: parse -> call pipeline -> write."""
