"""Intake: watch the inbox, wait for stable files, pair them into jobs, probe and claim them."""
