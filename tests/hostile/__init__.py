"""Hostile clients against real server, agent and CLI processes on 127.0.0.1."""
