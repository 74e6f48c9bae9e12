"""coderstack: Coder's networking stack on Twisted."""

__version__ = "0.1.0"
