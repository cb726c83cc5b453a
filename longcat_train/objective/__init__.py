"""The flow-matching objective the release was trained with: σ sampling and shift (`flow`), the
conditioning strategies that say which frames are clean and which carry loss (`strategy`), and
one batch's loss (`loss`). Training and validation's held-out loss both read it; it reads only the
model's forward signature."""
