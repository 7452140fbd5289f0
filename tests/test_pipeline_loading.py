"""Saving and loading MVDreamPipeline: its own folders, diffusers' loader, other writers'."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mvdiff.errors import UserError
from mvdiff.models import MultiViewUNet2DConditionModel
from mvdiff.pipelines import ENTRY_FILE, MVDreamPipeline
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
    assert index["_class_name"] == "MVDreamPipeline"
    loaded = MVDreamPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.unet, MultiViewUNet2DConditionModel)
    assert np.array_equal(images(pipe), images(loaded))

    half = MVDreamPipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16


def test_plain_diffusers_loader_with_the_entry_file(tmp_path):
    """diffusers resolves a string `_class_name` only inside diffusers and runs other classes
    only with trust_remote_code; ENTRY_FILE is a one-line import of the installed mvdiff."""
    from diffusers import DiffusionPipeline

    MVDreamPipeline(**tiny_components(0)).save_pretrained(tmp_path / "model")
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "model", custom_pipeline=ENTRY_FILE, trust_remote_code=True
    )
    assert type(pipe) is MVDreamPipeline


def test_plain_diffusers_loader_without_arguments(tmp_path):
    """Once mvdiff's pipeline is imported, DiffusionPipeline.from_pretrained(folder) needs no
    custom_pipeline and no trust_remote_code (a fresh interpreter, so nothing is cached)."""
    MVDreamPipeline(**tiny_components(0)).save_pretrained(tmp_path / "model")
    code = (
        "import sys; from diffusers import DiffusionPipeline\n"
        "from mvdiff.pipelines import MVDreamPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "assert type(pipe) is MVDreamPipeline, type(pipe)\n"
        "print(type(pipe.unet).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "model")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "MultiViewUNet2DConditionModel"


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
