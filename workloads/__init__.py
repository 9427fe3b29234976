"""What is asked: requests, arrivals, datasets and the E0–E6 track definitions (no Ray here)."""
