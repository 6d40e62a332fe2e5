"""Frontends: turn a user's model into a graph racc can analyse."""
