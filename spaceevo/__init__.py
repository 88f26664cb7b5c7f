"""spaceevo: hardware-aware neural architecture search for INT8 inference on real devices."""

__version__ = "0.1.0"
