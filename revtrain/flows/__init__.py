"""revtrain.flows (being written)."""
