"""Training: synthetic focus pairs, the gradient-aware loss, and the Ray Train loop."""
