"""Feature definitions and the window logic that computes them."""
