"""Labels belong to the data source: each source's ids and names, parsed from the config alone."""

import json

import numpy as np
import pytest

from data import labels, pipeline
from data.files import FolderSource
from tests.test_data import tiny_config
from vdit_jax import sampler


def folder_run(path, source="video_folder", num_classes=30, manifest=""):
  c = tiny_config(source=source, path=str(path), manifest=str(manifest))
  c.model.num_classes = num_classes
  return c


def write_manifest(path, lines):
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return path


def test_every_source_has_a_label_set():
  assert sorted(labels.LABEL_SETS) == sorted(pipeline.SOURCES)
  with pytest.raises(ValueError, match=r"data.source='youtube'.*latents, moving_digits"):
    labels.label_set(tiny_config(source="youtube"))


def test_synthetic_shapes_by_name_and_number():
  s = labels.label_set(tiny_config())
  for i in range(18):
    assert s.parse(s.name(i)) == i and s.parse(str(i)) == i
  assert s.parse("  Red   CIRCLE ") == 0 and s.name(7) == "green square"
  assert s.parse("18") == s.parse("unconditional") == 18 and s.name(18) == "unconditional"
  with pytest.raises(ValueError, match=r"unknown label 'purple circle'.*0..17.*'red circle'"):
    s.parse("purple circle")
  with pytest.raises(ValueError, match=r"label 19 is out of range.*0..17"):
    s.parse("19")
  with pytest.raises(ValueError, match="unknown label '-1'"):
    s.parse("-1")


def test_moving_digits_by_digit_and_word():
  c = tiny_config(source="moving_digits")
  c.model.num_classes = 10
  s = labels.label_set(c)
  assert [s.parse(x) for x in ("7", "seven", " Seven ", "0", "zero", "10")] == [7, 7, 7, 0, 0, 10]
  assert s.name(7) == "7"
  with pytest.raises(ValueError, match=r"unknown label 'ten'.*0..9.*'9'"):
    s.parse("ten")
  with pytest.raises(ValueError, match="label 11 is out of range"):
    s.parse("11")


@pytest.mark.parametrize("source", ["video_folder", "latents"])
def test_file_runs_parse_every_id_without_a_scan(source, tmp_path):
  # The folder does not exist: the label set reads the config (and manifest) only.
  s = labels.label_set(folder_run(tmp_path / "gone", source))
  assert [s.parse(x) for x in ("0", "17", "18", "25", "29", "30")] == [0, 17, 18, 25, 29, 30]
  assert s.name(25) == "25"
  with pytest.raises(ValueError, match=r"label 31 is out of range.*0..29.*no manifest"):
    s.parse("31")
  with pytest.raises(ValueError, match=r"unknown label 'red circle'.*0..29.*no manifest"):
    s.parse("red circle")
  c = folder_run(tmp_path, source, manifest=tmp_path / "nowhere.jsonl")
  with pytest.raises(ValueError, match="nowhere.jsonl' is not readable here"):
    labels.label_set(c).parse("dog")
  assert sampler.parse_labels("3,25", 2, 30, parse=labels.label_set(c).parse) == [3, 25]


def test_file_runs_parse_the_manifests_label_names(tmp_path):
  manifest = write_manifest(tmp_path / "m.jsonl", [
      {"path": "a.npy", "label": 20, "label_name": "Dog"},
      {"path": "b.npy", "label": 20, "label_name": "Dog"},
      {"path": "c.npy", "label": 3, "label_name": "hot  air balloon"},
      {"path": "d.npy", "label": 4},
      {"path": "e.npy"}])
  s = labels.label_set(folder_run(tmp_path, manifest=manifest))
  assert [s.parse(x) for x in ("dog", "DOG", "Hot Air Balloon", "4", "25")] == [20, 20, 3, 4, 25]
  assert (s.name(20), s.name(3), s.name(4)) == ("Dog", "hot air balloon", "4")
  with pytest.raises(ValueError, match=r"unknown label 'cat'.*'hot air balloon', 'Dog'"):
    s.parse("cat")
  assert sampler.parse_labels("dog, 3", 2, 30, parse=s.parse) == [20, 3]


@pytest.mark.parametrize("lines, match", [
    ([{"path": "v.npy", "label": 1, "label_name": "dog"},
      {"path": "v.npy", "label": 1, "label_name": "cat"}], "label 1 is named 'cat' here and 'dog'"),
    ([{"path": "v.npy", "label": 1, "label_name": "dog"},
      {"path": "v.npy", "label": 2, "label_name": "Dog"}], "'Dog' names labels 1 and 2"),
    ([{"path": "v.npy", "label_name": "dog"}], "needs a \"label\" id"),
    ([{"path": "v.npy", "label": 2, "label_name": "7"}], "not empty, a number"),
    ([{"path": "v.npy", "label": "dog"}], "label 'dog' is out of range.*\"label_name\""),
    ([{"path": "v.npy", "label": 2.5}], "label 2.5 is out of range"),
])
def test_bad_manifest_labels_stop_training_and_sampling(tmp_path, lines, match):
  np.save(tmp_path / "v.npy", np.zeros((4, 16, 16, 3), np.uint8))
  c = folder_run(tmp_path, manifest=write_manifest(tmp_path / "m.jsonl", lines))
  with pytest.raises(ValueError, match=match):
    FolderSource.from_config(c, "video_folder")
  with pytest.raises(ValueError, match=match):
    labels.label_set(c)


def test_manifest_ids_given_as_strings_or_whole_floats_still_train(tmp_path):
  np.save(tmp_path / "v.npy", np.zeros((4, 16, 16, 3), np.uint8))
  c = folder_run(tmp_path, manifest=write_manifest(tmp_path / "m.jsonl", [
      {"path": "v.npy", "label": "21"}, {"path": "v.npy", "label": 22.0},
      {"path": "v.npy", "label": 30}]))
  assert [e["label"] for e in FolderSource.from_config(c, "video_folder").entries] == [21, 22, 30]


def test_trainer_sample_labels_take_names():
  from vdit_jax import trainer

  c = tiny_config()
  c.sample.shapes, c.sample.labels = "2x8x8,2x8x8", "blue square, 4"
  assert trainer._sample_labels(c) == [8, 4]
  c.sample.labels = "purple"
  with pytest.raises(ValueError, match="unknown label 'purple'"):
    trainer._sample_labels(c)
