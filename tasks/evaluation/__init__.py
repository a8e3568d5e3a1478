"""The evaluation layer: scoring each registered model on held-out data, and champion/challenger decisions."""
