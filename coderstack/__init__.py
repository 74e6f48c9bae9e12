"""coderstack: Coder's networking stack on Twisted."""
