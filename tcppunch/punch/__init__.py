"""Hole punching: reuse-port sockets, candidates and port prediction, fire-time schedule, the engine."""
