"""Saving and loading MVDreamPipeline: its own folders and other writers' (plain diffusers,
old folders and the community layout: tests/test_folders.py)."""

import json

import numpy as np
import pytest
import torch

from mvdiff.errors import UserError
from mvdiff.models import MultiViewUNet2DConditionModel
from mvdiff.pipelines import MVDreamPipeline
from mvdiff.pipelines.loading import load_pipeline
from mvdiff.testing import tiny_components

KW = dict(height=64, width=64, num_inference_steps=2, output_type="np")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a corgi", generator=torch.Generator().manual_seed(seed), **KW).images


def test_save_and_load_round_trip(tmp_path):
    pipe = MVDreamPipeline(**tiny_components(0))
    pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mvdream", "MVDreamPipeline"]
    loaded = MVDreamPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.unet, MultiViewUNet2DConditionModel)
    assert np.array_equal(images(pipe), images(loaded))

    half = MVDreamPipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16


def test_loads_a_training_export_folder(tmp_path):
    """Folders written by mvdiff.training.export (library "mvdiff.models") load too."""
    from mvdiff.training.export import export_pipeline_folder

    components = tiny_components(0)
    export_pipeline_folder(tmp_path / "exported", **components)
    pipe, info = load_pipeline(str(tmp_path / "exported"), log=lambda *_: None)
    assert info["kind"] == "folder"
    assert np.array_equal(images(pipe), images(MVDreamPipeline(**components)))


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_pipeline(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(UserError, match="official checkpoint"):
        load_pipeline(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="broken.pt"):
        load_pipeline(str(tmp_path / "broken.pt"), cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="hub"):  # tests run with HF_HUB_OFFLINE=1
        load_pipeline("some-org/some-model-that-is-not-cached")
