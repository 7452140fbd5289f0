"""Faults and bad input for `mvdiff train` / `mvdiff dreambooth` / `train/train.py`: the promises.

Each test name reads as "entry point -- fault or bad input -- what the user gets":

* checkpoints are read as tensors and JSON only: a checkpoint file replaced by a pickle that
  would run code is refused with one line and never executed (own files, accelerate-style
  files, `model.pretrained` `.bin` weights);
* `--resume latest` skips a damaged newest checkpoint, saying which, or stops with one line;
* data that yields nothing usable (every sample bad, random bytes, URLs that open nothing)
  stops within seconds with one line naming the data; a bad sample among good ones is
  skipped and counted;
* out-of-range numbers in the config or on the command line are one-line errors, and
  `summary.json` is valid JSON (no bare NaN);
* SIGTERM saves a checkpoint and exits 143 with one line; a full disk while saving keeps the
  last good checkpoint, removes the partial one and stops with one line, and the next
  `--resume latest` works.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mvdiff.config import load_config
from mvdiff.data.shards import write_multiview_sample
from mvdiff.errors import UserError
from mvdiff.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"


class Evil:
    """Unpickling this creates ``marker``: what an attacker's checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_bytes(marker: Path, kind: str) -> bytes:
    """A file that runs code when fully unpickled: a raw pickle or torch.save's zip format."""
    if kind == "pickle":
        return pickle.dumps({"state": Evil(marker)})
    path = marker.parent / f"evil-{os.getpid()}.bin"
    torch.save({"state": {0: Evil(marker)}, "param_groups": []}, path)
    data = path.read_bytes()
    path.unlink()
    return data


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(shards, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, TINY, _overrides(shards, out, *overrides))


def _overrides(shards, out, *overrides) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.mv_shards={shards}/mv/*.tar" if shards else "data.mv_shards=",
        "data.p_2d=0",
        "data.batch_size=1",
        "log_every=1",
        "export=false",
        *overrides,
    ]


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """`mvdiff ARGS` in a subprocess (stdout: the resolved config; stderr: logs + the error)."""
    return subprocess.run([sys.executable, "-m", "mvdiff.cli", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)  # fmt: skip


def error_line(proc: subprocess.CompletedProcess, command: str = "train") -> str:
    """The one error line on stderr (no traceback; DataLoader workers may still log after it)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith(f"mvdiff {command}: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise Hang in the main thread after ``seconds`` (SIGALRM)."""

    def expire(signum, frame):
        raise Hang(f"still waiting after {seconds} s")

    before = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def train_error(cfg: TrainConfig) -> str:
    """train(cfg) must stop with a UserError; returns its message, which must be one line (the
    CLI prints it as `mvdiff train: error: MESSAGE`, exit 2: see test_cli_errors_are_one_line)."""
    from mvdiff.training.trainer import train

    with pytest.raises(UserError) as err:
        train(cfg)
    assert "\n" not in str(err.value), err.value
    return str(err.value)


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    """A real checkpoint after 1 step with EMA on: OUT/checkpoints/step-0000001."""
    from mvdiff.training.trainer import train

    out = tmp_path_factory.mktemp("ckpt")
    train(config(shards, out, "max_steps=1", "checkpoint.every=1", "ema=true"))
    return out / "checkpoints" / "step-0000001"


# ---- 1. nothing is unpickled -----------------------------------------------------------------

# what accelerate's save_state writes (pickles), none of which a resume may unpickle
ACCELERATE_FILES = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin",
                    "scheduler.bin", "sampler.bin", "scaler.pt", "pytorch_model.bin"]  # fmt: skip


def test_train_resume_from_a_checkpoint_with_a_code_running_pickle_never_runs_it(
    shards, checkpoint, tmp_path
):
    """train --resume CKPT (EMA on) -- each file of a real checkpoint replaced by a pickle that
    runs code, or an accelerate-style state file added as one -- the code never runs; a
    replaced file is a one-line error naming the checkpoint, an added file is never read."""
    from mvdiff.training.trainer import train

    marker = tmp_path / "pwned"
    own = sorted(p.name for p in checkpoint.iterdir())
    assert "model.safetensors" in own and "trainer_state.json" in own
    for i, name in enumerate(sorted(set(own) | set(ACCELERATE_FILES))):
        ckpt = tmp_path / name / "step-0000001"
        shutil.copytree(checkpoint, ckpt)
        (ckpt / name).write_bytes(evil_bytes(marker, ["torch", "pickle"][i % 2]))
        cfg = config(shards, tmp_path / name, "max_steps=1", "ema=true",
                     f"checkpoint.resume={ckpt}")  # fmt: skip
        if name in own:
            assert str(ckpt) in train_error(cfg)
        else:
            assert train(cfg)["steps"] == 1
        assert not marker.exists(), f"{name}: the pickle ran"


def test_train_resume_from_an_accelerate_style_checkpoint_loads_tensors_only(
    shards, checkpoint, tmp_path
):
    """train --resume latest -- a checkpoint in accelerate's save_state layout whose EMA custom
    state (the reported attack) and optimizer are pickles that run code -- one line naming the
    file, the code never runs."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    shutil.copy(checkpoint / "model.safetensors", ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "nan_skips": 0}))
    for name in ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"]:
        (ckpt / name).write_bytes(evil_bytes(marker, "torch"))
    line = train_error(config(shards, tmp_path / "run", "max_steps=2", "ema=true",
                              "checkpoint.resume=latest"))  # fmt: skip
    assert "optimizer.bin" in line or "custom_checkpoint_0.pkl" in line
    assert not marker.exists()


def test_train_model_pretrained_with_pickled_bin_weights_is_refused_in_one_line(tmp_path):
    """train model.pretrained=FOLDER -- unet/diffusion_pytorch_model.bin is a pickle that runs
    code, or is not a weights file at all -- one line naming the folder, the code never runs."""
    from mvdiff.testing import tiny_components
    from mvdiff.training.components import load_components

    folder = tmp_path / "sd"
    parts = tiny_components(seed=0)
    parts["unet"].save_pretrained(folder / "unet", safe_serialization=False)
    parts["vae"].save_pretrained(folder / "vae")
    parts["text_encoder"].save_pretrained(folder / "text_encoder")
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    assert weights.is_file()
    marker = tmp_path / "pwned"
    weights.write_bytes(evil_bytes(marker, "torch"))
    cfg = config(None, tmp_path / "out", f"model.pretrained={folder}", f"data.mv_shards={TINY}")
    assert str(folder) in train_error(cfg)
    for content in [evil_bytes(marker, "pickle"), b"not weights", b""]:
        weights.write_bytes(content)
        with pytest.raises(UserError, match="model.pretrained=.*unet") as err:
            load_components(str(folder))
        assert "\n" not in str(err.value)
    assert not marker.exists()


# ---- corrupt checkpoints ---------------------------------------------------------------------


def test_train_resume_latest_skips_a_damaged_newest_checkpoint_and_says_which(
    shards, checkpoint, tmp_path, caplog
):
    """train --resume latest -- the newest checkpoint's weights truncated -- resumes from the
    newest intact one, logging which; every checkpoint damaged -- one line."""
    from mvdiff.training.trainer import train

    out = tmp_path / "run"
    shutil.copytree(checkpoint, out / "checkpoints" / "step-0000001")
    shutil.copytree(checkpoint, out / "checkpoints" / "step-0000002")
    state = out / "checkpoints" / "step-0000002" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 1', '"step": 2'))
    weights = out / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with caplog.at_level("WARNING"):
        summary = train(config(shards, out, "max_steps=2", "ema=true", "checkpoint.every=0",
                               "checkpoint.resume=latest"))  # fmt: skip
    assert summary["steps"] == 2
    assert "step-0000002" in caplog.text and "step-0000001" in caplog.text
    # now both are damaged (the step-2 just written, and step-1 below)
    for name in ["step-0000001", "step-0000002"]:
        (out / "checkpoints" / name / "optimizer.pt").write_bytes(b"garbage")
    line = train_error(config(shards, out, "max_steps=3", "ema=true", "checkpoint.resume=latest"))
    assert "optimizer.pt" in line


def test_train_resume_at_max_steps_writes_valid_json_without_nan(shards, checkpoint, tmp_path):
    """train --resume latest with nothing left to do -- no loss was computed -- summary.json is
    valid JSON with final_loss null (never a bare NaN)."""
    from mvdiff.training.trainer import train

    out = tmp_path / "run"
    shutil.copytree(checkpoint, out / "checkpoints" / "step-0000001")
    train(config(shards, out, "max_steps=1", "ema=true", "checkpoint.resume=latest"))

    def no_constants(name):
        raise ValueError(f"summary.json holds {name}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_constants)
    assert summary["steps"] == 1 and summary["final_loss"] is None


# ---- 2./3. data: bad samples are skipped and counted; nothing usable stops in seconds ---------


def _bad_samples_shard(path: Path, views: int = 8, res: int = 32) -> None:
    """A shard of samples that shard-info rejects: non-finite cameras, a missing view, cameras
    of the wrong shape, cameras that are not rigid transforms, unreadable JSON."""
    rgba = np.zeros((views, res, res, 4), np.uint8)
    rgba[..., 3] = 255
    c2w = np.tile(np.eye(4, dtype=np.float32), (views, 1, 1))
    nan = c2w.copy()
    nan[2, 0, 3] = np.nan
    inf = c2w.copy()
    inf[0, 1, 1] = np.inf
    scaled = c2w * 3.0
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        write_multiview_sample(tar, "nancam", rgba, nan, {"caption": "a"})
        write_multiview_sample(tar, "infcam", rgba, inf, {"caption": "a"})
        write_multiview_sample(tar, "notrigid", rgba, scaled, {"caption": "a"})
        write_multiview_sample(tar, "shape", rgba, c2w[:, :3], {"caption": "a"})
        members = {}

        class Collect:  # write_multiview_sample to a dict, then drop one view
            def addfile(self, info, data):
                members[info.name] = data.read()

        write_multiview_sample(Collect(), "noview", rgba, c2w, {"caption": "a"})
        del members["noview.rgba.005.png"]
        members["badjson.json"] = b"{not json"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_train_bad_samples_among_good_ones_are_skipped_and_counted(shards, tmp_path):
    """train -- a shard of samples with non-finite / malformed cameras, a missing view or bad
    JSON next to good shards -- training runs with a finite loss; summary.json and log.jsonl
    count the skipped samples."""
    from mvdiff.training.trainer import train

    data = tmp_path / "data"
    shutil.copytree(shards / "mv", data)
    _bad_samples_shard(data / "mv-bad.tar")
    summary = train(config(None, tmp_path / "run", f"data.mv_shards={data}/*.tar", "max_steps=8",
                           "checkpoint.every=0", "data.shuffle_buffer=0"))  # fmt: skip
    assert summary["steps"] == 8 and summary["final_loss"] is not None
    assert summary["skipped_samples"] >= 1
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(entry["skipped_samples"] for entry in logs) == summary["skipped_samples"]


@pytest.mark.parametrize(
    "case, workers",
    [("bad_samples", 0), ("random_bytes", 2), ("nothing_opens", 0)],
)
def test_train_data_with_nothing_usable_stops_in_seconds_with_one_line(tmp_path, case, workers):
    """train -- every sample invalid / a shard of random bytes (in DataLoader workers) / a URL
    brace pattern whose shards do not open -- stops within seconds (not at step 0 forever)
    with one line naming data.mv_shards and the problem, exit 2."""
    if case == "bad_samples":
        spec, problem = str(tmp_path / "mv-bad.tar"), "not"
        _bad_samples_shard(tmp_path / "mv-bad.tar")
    elif case == "random_bytes":
        spec, problem = str(tmp_path / "mv-rand.tar"), "tar"
        (tmp_path / "mv-rand.tar").write_bytes(np.random.default_rng(0).bytes(20000))
    else:
        spec, problem = f"file://{tmp_path}/gone/mv-{{000..003}}.tar", "No such file"
    t0 = time.time()
    # with workers the error is raised in a DataLoader worker and re-raised by torch
    with deadline(90):  # a hang fails the test instead of stalling the suite
        line = train_error(config(None, tmp_path / "run", f"data.mv_shards={spec}",
                                  "max_steps=2", f"data.num_workers={workers}"))  # fmt: skip
    assert "data.mv_shards" in line and problem in line, line
    assert time.time() - t0 < 90


# ---- 4. numbers out of range are one line -------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [("data.num_views=-1", "data.num_views"), ("data.resolution=0", "data.resolution"),
     ("data.resolution=30", "data.resolution"), ("data.batch_size=0", "data.batch_size"),
     ("data.p_2d=1.5", "data.p_2d"), ("optim.lr=0", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
     ("optim.betas=[0.9,1.0]", "optim.betas"), ("gradient_accumulation_steps=0",
     "gradient_accumulation_steps"), ("ema_decay=1.5", "ema_decay"), ("max_steps=0", "max_steps"),
     ("checkpoint.every=-1", "checkpoint.every"), ("validation.num_views=0",
     "validation.num_views"), ("log_every=0", "log_every")],
)  # fmt: skip
def test_train_config_values_out_of_range_are_one_line_errors(override, key):
    """train --set KEY=VALUE -- a count, size, rate or probability out of its range (or NaN)
    -- a one-line error naming the key (was: accepted, then a traceback or a silent no-op)."""
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        load_config(TrainConfig, TINY, [override])
    assert "\n" not in str(err.value)


def test_dreambooth_config_values_out_of_range_are_one_line_errors():
    """dreambooth --set -- LoRA rank 0, prior batch size 0 -- a one-line error naming the key."""
    from mvdiff.training.config import DreamBoothTrainConfig

    for override in ["dreambooth.lora.rank=0", "dreambooth.prior.batch_size=0"]:
        with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
            load_config(DreamBoothTrainConfig, None, [override])


def test_train_cli_negative_max_steps_is_one_line_and_exports_nothing(shards, tmp_path):
    """mvdiff train --max-steps -5 -- one line naming max_steps, exit 2, no model exported."""
    proc = cli("train", "--config", str(TINY), "--max-steps", "-5", "--output-dir",
               str(tmp_path / "run"), "--set", f"data.mv_shards={shards}/mv/*.tar")  # fmt: skip
    assert proc.returncode == 2
    assert "max_steps" in error_line(proc)
    assert not (tmp_path / "run" / "model").exists()


# ---- 5. SIGTERM ------------------------------------------------------------------------------


def _wait_for(predicate, proc, seconds: float) -> None:
    deadline = time.time() + seconds
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def test_train_sigterm_saves_a_checkpoint_and_exits_143_with_one_line(shards, tmp_path):
    """mvdiff train (a subprocess) -- SIGTERM (scheduler, Docker, Ray) mid-run -- finishes the
    step, saves a checkpoint of it, exits 143 with one line naming it; --resume latest goes on
    from there."""
    from mvdiff.training.trainer import train

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mvdiff.cli", "train", "--config", str(TINY)]
    for o in _overrides(shards, out, "max_steps=1000", "checkpoint.every=0"):
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    log = out / "log.jsonl"
    _wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, proc, 120)
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [x for x in stderr.splitlines() if x.startswith("mvdiff train: ")]
    assert len(lines) == 1 and "SIGTERM" in lines[0], stderr[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and str(ckpts[0]) in lines[0]
    assert not list((out / "checkpoints").glob("tmp-*"))
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert step >= 2
    summary = train(config(shards, out, f"max_steps={step + 1}", "checkpoint.resume=latest"))
    assert summary["steps"] == step + 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_py_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_128_plus_signal(
    shards, tmp_path, capsys, signum
):
    """train/train.py -- SIGTERM or SIGINT (Ctrl-C) delivered to the process mid-run -- a
    checkpoint of the step reached, exit 143 / 130, one line; the handlers are restored."""
    import threading

    from tests.scripts import load_script

    script = load_script(ROOT / "train" / "train.py", "train_script")
    out = tmp_path / "run"
    log = out / "log.jsonl"

    def send_when_running():
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
            time.sleep(0.05)
        if log.is_file():  # training is under way (handlers installed): never hit pytest itself
            os.kill(os.getpid(), signum)

    def not_handled(signum, frame):  # reached only if train.py left the signal alone
        raise RuntimeError(f"{signal.Signals(signum).name} was not handled by train.py")

    ours = {s: signal.signal(s, not_handled) for s in (signal.SIGINT, signal.SIGTERM)}
    sender = threading.Thread(target=send_when_running)
    sender.start()
    argv = ["--config", str(TINY)]
    for o in _overrides(shards, out, "max_steps=1000", "checkpoint.every=0"):
        argv += ["--set", o]
    try:
        code = script.main(argv)
    except (RuntimeError, KeyboardInterrupt) as e:
        code = repr(e)
    finally:
        sender.join()
        after = {s: signal.getsignal(s) for s in ours}
        for s, handler in ours.items():
            signal.signal(s, handler)
    assert code == 128 + signum
    assert after == dict.fromkeys(ours, not_handled)  # restored
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("train.py: ")]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], err[-2000:]
    assert len(list((out / "checkpoints").glob("step-*"))) == 1


# ---- 6. disk full --------------------------------------------------------------------------------


class SmallDisk:
    """A folder on a file system that can be made full: a tmpfs mount (root) filled with a
    ballast file, or, where mounting is not permitted, RLIMIT_FSIZE while the code runs
    (writes past 2 MB fail with EFBIG; SIGXFSZ ignored so they raise OSError)."""

    def __init__(self, root: Path, size_mb: int = 128):
        self.dir = root / "disk"
        self.dir.mkdir()
        self.mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(self.dir)],
            capture_output=True,
        ).returncode == 0  # fmt: skip
        self.ballast = self.dir / "ballast"
        self.full = False

    def fill(self, leave_bytes: int = 2 << 20) -> None:
        self.full = True
        if not self.mounted:
            return
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        with open(self.ballast, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(0, free - leave_bytes))

    def free(self) -> None:
        self.full = False
        self.ballast.unlink(missing_ok=True)

    @contextlib.contextmanager
    def in_process(self):
        """The same limit for code run in this process (no-op with a tmpfs)."""
        if self.mounted or not self.full:
            yield
            return
        import resource

        before = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, before[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, before)
            signal.signal(signal.SIGXFSZ, handler)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path)
    yield disk
    disk.close()


def test_train_disk_full_while_saving_keeps_the_last_checkpoint_and_resume_works(
    shards, small_disk
):
    """train -- the disk fills up while a checkpoint is written -- the partial tmp-step-*
    folder is removed, the last good checkpoint is kept, one line naming the checkpoint and the
    cause; after space is freed, --resume latest goes on from the last good one."""
    from mvdiff.training.trainer import train

    out = small_disk.dir / "run"
    train(config(shards, out, "max_steps=1", "ema=true", "checkpoint.every=1"))
    small_disk.fill()
    with small_disk.in_process():
        line = train_error(config(shards, out, "max_steps=2", "ema=true",
                                  "checkpoint.resume=latest"))  # fmt: skip
    assert "step-0000002" in line and "step-0000001" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    small_disk.free()
    summary = train(config(shards, out, "max_steps=2", "ema=true", "checkpoint.resume=latest"))
    assert summary["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001",
                                                                       "step-0000002"]  # fmt: skip


# ---- sample / eval load paths ---------------------------------------------------------------------


def test_sample_lora_adapter_with_damaged_weights_is_one_line(tmp_path):
    """mvdiff sample --model ADAPTER (a dreambooth LoRA) -- adapter weights truncated, or a
    pickle in their place -- one line naming the adapter, nothing unpickled."""
    from mvdiff.pipelines.loading import apply_lora_adapter, save_lora_adapter
    from mvdiff.testing import tiny_components
    from mvdiff.training.config import LoraSettings
    from mvdiff.training.dreambooth import add_lora

    unet = tiny_components(seed=0)["unet"]
    folder = save_lora_adapter(unet, add_lora(unet, LoraSettings(rank=2)), tmp_path / "adapter",
                               {"base_model": "tiny"})  # fmt: skip
    weights = next(folder.glob("*.safetensors"))
    marker = tmp_path / "pwned"
    for content in [weights.read_bytes()[:-50], evil_bytes(marker, "torch")]:
        weights.write_bytes(content)
        with pytest.raises(UserError, match="--lora") as err:
            apply_lora_adapter(tiny_components(seed=0)["unet"], folder, log=lambda *_: None)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_train_disk_full_while_exporting_the_model_is_one_line_and_leaves_no_partial_folder(
    small_disk,
):
    """train (export at the end) -- the disk fills up while model/ is written -- one line
    naming the folder, no model.tmp left behind."""
    from mvdiff.testing import tiny_components
    from mvdiff.training.export import export_pipeline_folder

    parts = tiny_components(seed=0)
    small_disk.fill()
    with small_disk.in_process(), pytest.raises(UserError, match="model") as err:
        export_pipeline_folder(small_disk.dir / "model", parts["unet"], parts["vae"],
                               parts["text_encoder"], parts["tokenizer"], parts["scheduler"])  # fmt: skip
    assert "\n" not in str(err.value)
    assert not (small_disk.dir / "model.tmp").exists() and not (small_disk.dir / "model").exists()
