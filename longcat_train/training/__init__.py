"""The training loop and what it is made of: data preparation, strategies, flow matching, checkpoints."""
