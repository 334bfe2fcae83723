"""The package version, in a leaf module so that any part of the package can name it without importing the rest."""
__version__ = "0.1.0"
