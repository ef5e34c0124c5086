"""The session layer: one secure connection per pair of peers, carrying multiplexed streams."""
