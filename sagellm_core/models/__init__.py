"""Model loading and execution."""
