"""bootd: network-boot server for computer labs."""
__version__ = "0.1.0"
