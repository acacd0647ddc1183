"""Evaluators: held-out videos stay out of training, the held-out loss is a fixed function of
the model, the trainer runs evaluators when due and after the last step (also on resume), and
bad evaluator settings fail before anything compiles."""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import pipeline, synthetic_shapes
from evals import heldout, registry
from tests import helpers
from vdit_jax import backends, metrics, text, trainer
from vdit_jax import sharding as shard_lib

EVAL_FIELDS = {"data.heldout": 12, "evals.names": "heldout", "evals.heldout.videos": 10,
               "evals.heldout.every": 2, "evals.heldout.t_values": (0.25, 0.75),
               "train.steps": 4, "train.ckpt_every": 2, "sample.steps": 1}


def _config(**fields):
  return helpers.tiny_config(**{**EVAL_FIELDS, **fields})


def test_held_out_indices_are_never_trained_on():
  config = _config(**{"data.num_videos": 40})
  maker = pipeline.BatchMaker(config)
  held = set(maker.heldout_indices(12))
  assert held == set(range(28, 40))
  trained = {i for step in range(60) for row in maker.plan(step)[0] for i in row}
  assert trained and not trained & held and max(trained) < 28
  with pytest.raises(ValueError, match="data.heldout"):
    maker.heldout_indices(13)


def test_held_out_batches_hold_each_video_once_in_whole_batches():
  config = _config()
  maker = pipeline.BatchMaker(config)
  batches, rows = maker.heldout_batches(10)
  assert sorted(i for row in rows for i in row) == maker.heldout_indices(10)
  assert len(rows) == len(batches) * config.data.batch_rows
  seg = np.concatenate([b["segment_ids"] for b in batches])
  assert [len(set(r[r > 0].tolist())) for r in seg] == [len(r) for r in rows]
  again, _ = maker.heldout_batches(10)  # a fixed set: the same packed tokens every time
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("evals") / "run")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(metrics, "measured_peak_flops", lambda: 1e12)
    trainer.train(_config(), workdir)
  return workdir


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_the_trainer_runs_evaluators_when_due_and_after_the_last_step(evaluated_run):
  evals = [m for m in _lines(evaluated_run) if "heldout/loss" in m]
  assert [m["step"] for m in evals] == [2, 4]
  for m in evals:
    assert np.isfinite(m["heldout/loss"]) and m["heldout/seconds"] > 0
    assert {"heldout/loss_t0.25", "heldout/loss_t0.75"} <= set(m)
    assert any(k.startswith("heldout/loss_") and "x" in k for k in m)  # per video size
  with open(registry.result_path(evaluated_run, 4)) as f:
    saved = json.load(f)
  assert len(saved["per_video"]["heldout/loss"]) == 10
  assert saved["scalars"]["heldout/loss"] == pytest.approx(
      np.mean(saved["per_video"]["heldout/loss"]))
  # each t-bin is its own measurement
  assert saved["scalars"]["heldout/loss_t0.25"] != saved["scalars"]["heldout/loss_t0.75"]


def test_a_finished_run_is_evaluated_again_only_if_its_result_is_missing(evaluated_run):
  before = len(_lines(evaluated_run))
  trainer.train(_config(), evaluated_run)  # finished and evaluated: nothing to do
  assert len(_lines(evaluated_run)) == before
  os.remove(registry.result_path(evaluated_run, 4))  # as if it stopped before evaluating
  trainer.train(_config(), evaluated_run)
  lines = _lines(evaluated_run)
  assert len(lines) == before + 1 and lines[-1]["step"] == 4 and "heldout/loss" in lines[-1]
  assert os.path.exists(registry.result_path(evaluated_run, 4))


@contextlib.contextmanager
def _evaluating(config):
  """The context an evaluator is built from, inside the run's mesh and axis rules."""
  mesh = shard_lib.make_mesh(config.mesh)
  backend = backends.resolve(config.model, config.data.max_segments)
  graphdef, _ = trainer.init_state(config, backend)
  with jax.set_mesh(mesh), shard_lib.axis_rules(config.mesh.rules):
    yield registry.EvalContext(config, graphdef, backend, mesh)


def test_held_out_loss_is_a_fixed_function_of_the_model(evaluated_run):
  config = _config()
  state = helpers.restore_state(evaluated_run, 4)
  with _evaluating(config) as ctx:
    ev = heldout.HeldoutLoss(ctx)
    first = ev(state, 4).scalars
    second = ev(state, 4).scalars
    moved = dict(state, ema=helpers.random_params_like(state["ema"], seed=1))
    other = ev(moved, 4).scalars
  assert first == second
  with open(registry.result_path(evaluated_run, 4)) as f:
    assert first["loss"] == pytest.approx(json.load(f)["scalars"]["heldout/loss"], rel=1e-5)
  assert other["loss"] != pytest.approx(first["loss"], rel=1e-3)


@pytest.mark.parametrize("fields, message", [
    ({"evals.names": "heldout,fid"}, "unknown evaluators"),
    ({"evals.heldout.videos": 13}, "data.heldout"),
    ({"evals.heldout.every": -1}, "every"),
    ({"evals.names": "temporal", "data.source": "moving_digits", "evals.temporal.videos": 4},
     "synthetic_shapes"),
    ({"evals.names": "temporal", "evals.temporal.videos": 4, "evals.temporal.sampler": "rk4"},
     "sampler 'rk4' is unknown"),
    ({"evals.names": "redraw", "evals.redraw.videos": 4, "evals.redraw.eta": -0.5},
     r"eta=-0.5 must be in \[0, 1\]"),
    ({"evals.heldout.label_t": 1.5}, "label_t=1.5"),
])
def test_bad_evaluator_settings_fail_before_anything_is_compiled(tmp_path, fields, message):
  with pytest.raises(ValueError, match=message):
    trainer.train(_config(**fields), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_temporal_evaluator_scores_samples_next_to_real_videos(evaluated_run, tmp_path,
                                                              monkeypatch):
  from evals import features, temporal, video_metrics
  tiny_recipe = features.Recipe(frames=(2, 4), side=(8.0, 12.0), aspect_ratios=(0.5, 1.0, 2.0),
                                train_videos=16, eval_videos=8, batch_size=4, steps=2,
                                widths=(4, 8), feature_dim=8)
  real_load = features.load_or_train
  monkeypatch.setattr(features, "load_or_train", lambda: real_load(str(tmp_path), tiny_recipe))
  config = _config(**{"evals.names": "temporal", "evals.temporal.videos": 6,
                      "evals.temporal.steps": 2})
  state = helpers.restore_state(evaluated_run, 4)
  with _evaluating(config) as ctx:
    ev = temporal.TemporalConsistency(ctx)
    result = ev(state, 4)
  for name in video_metrics.METRICS:
    assert len(result.per_video[name]) == 6
    assert f"{name}_ci" in result.scalars and f"real_{name}" in result.scalars
  # The real held-out videos show the labels they carry (most of them, at 8 to 12 pixels); a
  # 4-step model's samples do not.
  assert result.scalars["real_label_ok"] > max(0.5, result.scalars["label_ok"])
  assert result.scalars["fd"] > 0 and np.isfinite(result.scalars["fd"])
  # data.heldout=12 holds a second real set of 6: the distance a perfect model would score
  assert result.scalars["fd_real"] >= 0 and np.isfinite(result.scalars["fd_real"])


def test_rescoring_a_checkpoint_matches_the_run_and_keeps_its_results(evaluated_run, tmp_path):
  """evaluate.py's rescore: the held-out loss of checkpoint 4 restored afresh equals what the
  training run measured there, written to a folder of its own; bad settings fail first."""
  from evals import rescore

  own = registry.result_path(evaluated_run, 4)
  with open(own) as f:
    before = f.read()
  path, scalars = rescore.rescore(evaluated_run, step=4, names="heldout",
                                  out=str(tmp_path / "again"))
  assert path == registry.result_path(str(tmp_path / "again"), 4) and os.path.exists(path)
  assert scalars["heldout/loss"] == pytest.approx(json.loads(before)["scalars"]["heldout/loss"],
                                                  rel=1e-5)
  with open(own) as f:
    assert f.read() == before  # the run's own result is untouched
  with pytest.raises(ValueError, match="sampler 'rk4' is unknown"):
    rescore.rescore(evaluated_run, names="temporal", sampler="rk4", videos=6,
                    out=str(tmp_path / "x"))
  with pytest.raises(ValueError, match=r"available steps \[2, 4\]"):
    rescore.rescore(evaluated_run, step=3, out=str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
  assert rescore.settings_name("temporal", sampler="heun", steps=60, cfg=None) == (
      "temporal_sampler-heun_steps-60")


def test_change_label_moves_one_digit_and_keeps_empty_slots():
  lab = jnp.array([[0, 7, 17, 18]])  # red circle, green square, magenta triangle, null
  sizes = (3, 6)  # label = shape * 6 + colour
  assert heldout.change_label(lab, 0, sizes, 18).tolist() == [[6, 13, 5, 18]]  # next shape
  assert heldout.change_label(lab, 1, sizes, 18).tolist() == [[1, 8, 12, 18]]  # next colour
  assert heldout.change_label(lab, -1, sizes, 18).tolist() == [[18, 18, 18, 18]]


def test_label_gaps_are_zero_for_a_model_blind_to_its_label(evaluated_run):
  """label_gap_*: the held-out loss with a part of the label changed, less the true label's.
  Exactly 0 when every label embeds the same; not 0 for the trained model's own table."""
  config = _config(**{"evals.heldout.label_t": 0.6})
  state = helpers.restore_state(evaluated_run, 4)
  with _evaluating(config) as ctx:
    ev = heldout.HeldoutLoss(ctx)
    seen = ev(state, 4)
    # Every row of the label table (the null one too) made the first row: no label is visible.
    blind_ema = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.broadcast_to(x[:1], x.shape) if "label_embed" in str(path) else x,
        state["ema"])
    blind = ev(dict(state, ema=blind_ema), 4)
  for part in ("shape", "colour", "null"):
    assert len(seen.per_video[f"label_gap_{part}"]) == 10  # every held-out video has a label
    assert seen.scalars[f"label_gap_{part}"] != 0.0
    assert blind.scalars[f"label_gap_{part}"] == 0.0


def test_caption_gaps_are_zero_for_words_the_model_cannot_tell_apart():
  """caption_gap_*: the held-out loss with one class of caption words swapped (or every caption
  nulled), less the true captions'. Exactly 0 for a class whose words all embed alike; not 0
  for the others, nor for the null caption."""
  config = _config(**{"evals.heldout.label_t": 0.6, "model.caption.mode": "tokens",
                      "model.caption.length": 5, "model.caption.pooled": True})
  with _evaluating(config) as ctx:
    _, state = trainer.init_state(config, ctx.backend)
    # Every parameter non-zero: the zero-initialised cross-attention output would hide captions.
    ema = helpers.random_params_like(state["ema"], seed=2, scale=0.2)
    ev = heldout.HeldoutLoss(ctx)
    assert set(ev.caption_swaps) == {"null", "colour", "shape", "direction"}
    seen = ev({"ema": ema}, 0)
    tokenizer = pipeline.BatchMaker(config).captions.tokenizer
    colours = [tokenizer.ids[w] for w in synthetic_shapes.COLOR_NAMES]

    def alike(path, x):  # the caption word table's colour rows made the first colour's
      if "caption_encoder" in str(path) and "inp" in str(path):
        return x.at[jnp.array(colours)].set(x[colours[0]])
      return x
    colour_blind = ev({"ema": jax.tree_util.tree_map_with_path(alike, ema)}, 0)
  for part in ("null", "colour", "shape", "direction"):
    assert len(seen.per_video[f"caption_gap_{part}"]) == 10  # every held-out video has a caption
    assert seen.scalars[f"caption_gap_{part}"] != 0.0
  assert colour_blind.scalars["caption_gap_colour"] == 0.0
  assert colour_blind.scalars["caption_gap_direction"] != 0.0


def test_caption_swaps_move_each_known_word_of_a_class_to_the_next():
  tokenizer = text.Tokenizer(["a", "red", "blue", "green", "up"])
  swaps = heldout.caption_swaps(tokenizer, {"colour": ("red", "green", "blue", "cyan"),
                                            "direction": ("up", "down")}, vocab=8)
  assert list(swaps) == ["colour"]  # "down" is unknown: one direction word swaps with nothing
  ids = tokenizer.ids
  id_map = swaps["colour"]
  assert [id_map[ids[w]] for w in ("red", "green", "blue", "a", "up")] == [
      ids["green"], ids["blue"], ids["red"], ids["a"], ids["up"]]
  assert id_map[0] == 0 and id_map[7] == 7  # padding and unused ids stay


def test_redraw_scores_videos_redrawn_from_each_t(evaluated_run):
  """evals.redraw: every temporal metric per t, next to the real videos' own scores; bad t
  values fail before anything is built."""
  config = _config(**{"evals.names": "redraw", "evals.redraw.videos": 4,
                      "evals.redraw.t_values": (0.05, 1.0), "evals.redraw.steps": 2})
  registry.validate(config)
  state = helpers.restore_state(evaluated_run, 4)
  with _evaluating(config) as ctx:
    result = registry.EVALUATORS["redraw"](ctx)(state, 4)
  for t in ("0.05", "1"):
    assert len(result.per_video[f"shape_drift_t{t}"]) == 4
    assert np.isfinite(result.scalars[f"colour_flicker_t{t}"])
  assert "real_shape_drift" in result.scalars
  # Redrawn from little noise the videos keep their colours: far closer to real than from noise.
  real = result.scalars["real_colour_flicker"]
  assert (abs(result.scalars["colour_flicker_t0.05"] - real)
          < abs(result.scalars["colour_flicker_t1"] - real))
  for bad in ((), (0.0, 0.5), (1.5,)):
    with pytest.raises(ValueError, match="evals.redraw.t_values"):
      registry.validate(_config(**{"evals.names": "redraw", "evals.redraw.videos": 4,
                                   "evals.redraw.t_values": bad}))
