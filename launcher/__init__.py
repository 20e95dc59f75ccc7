"""chla launcher: YAML recipe -> validated model -> stage graph -> jobs. Imports no torch."""

__version__ = "0.1.0"
