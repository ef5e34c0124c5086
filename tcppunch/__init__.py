"""tcppunch: direct TCP between hosts behind NAT by simultaneous open, relay when it cannot work."""

__version__ = "0.1.0"
