"""Training with accelerate: identity adapters (``idgen.train.adapter``) on prepared face photos."""
