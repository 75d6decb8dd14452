"""How new attention weights are seeded from trained ones: pure tensor functions."""
