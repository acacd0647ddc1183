"""Evaluations of generated videos: pixel metrics and the corruptions that validate them."""
