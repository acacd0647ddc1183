"""Evaluation of trained models: evaluators the trainer runs, the metrics they report, and attention ablations."""
