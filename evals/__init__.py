"""Evaluations of generated videos that need no download."""
