"""The metrics plot used for run reports: one panel per key, from a run's metrics.jsonl."""

import json

import numpy as np
import pytest

from vdit_jax import plots


def test_plot_metrics_writes_a_png_of_the_curves(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as f:
    for step in range(1, 21):
      f.write(json.dumps({"step": step, "loss": 1.0 / step, "grad_norm": 0.5}) + "\n")
  out = plots.plot_metrics(str(path), str(tmp_path / "plots" / "loss.png"),
                           keys=("loss", "grad_norm"))
  import matplotlib.image as mpimg
  image = mpimg.imread(out)
  assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side
  assert np.std(image[..., :3]) > 0.01  # not a blank canvas


def test_plot_metrics_rejects_an_empty_run(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("")
  with pytest.raises(ValueError, match="no metric lines"):
    plots.plot_metrics(str(path), str(tmp_path / "x.png"))
