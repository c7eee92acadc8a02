"""Delivery: outputs watcher -> upload -> presigned links -> batch zip -> chat notification."""
