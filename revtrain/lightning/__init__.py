"""revtrain.lightning (being written)."""
