"""Host-side data: sources, packing and grain pipelines (plain numpy, never jax)."""
