"""Neural network modules (no training, tracking or I/O code)."""
