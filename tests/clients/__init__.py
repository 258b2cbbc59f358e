"""Real clients the tests compare quantlm with, each in a test environment of its own (never quantlm's)."""
