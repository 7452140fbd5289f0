"""Every command in README's ```bash blocks runs as written, or is listed here with the reason.

The commands are read from README.md (backslash continuations joined, ``&&`` chains split,
comments dropped) and each must be in exactly one of

* ``RUN``: run, in README order within its block, by ``bash`` in a scratch folder that holds
  the repository's ``train/``, ``infer/``, ``data_prep/``, ``mvdiff/`` and ``tests/`` (as
  links) and ``outputs/quickstart`` (the run of README's first command, shared with
  tests/test_quickstart.py); ``data/mv`` is the quickstart's renders (what README's
  ``mvdiff render`` line writes at full size). Some get extra arguments that shrink their
  budget (``tiny``), nothing else;
* ``SKIP``: not run, with the reason (GPUs, large downloads, network, credentials, an
  hour of CPU, or a placeholder such as ``...`` that is not a command yet).

A new README command in neither list fails :func:`test_every_readme_command_is_run_or_listed`,
and so does a listed command README no longer has (``proposed`` entries excepted: wording
suggested for README, run once it is there).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# ---- the reviewed lists -------------------------------------------------------------------
SKIP = {
    "pip install torch==2.13.0": "installs packages from the network (the test environment has them)",
    'pip install -e ".[render]"': "installs packages from the network",
    'pip install -e ".[dev,render,ray]"': "installs packages from the network",
    "pip install --no-deps img2dataset": "installs packages from the network",
    'pip install -e ".[data]"': "installs packages from the network",
    'pip install -e ".[render,cloud]"': "installs packages from the network",
    'HF_HUB_OFFLINE=1 python -m pytest -q -m "slow or not slow"': "is this test suite",
    "mvdiff convert sd-v2.1-base-4view.pt models/mvdream-sd21": "needs the official 5 GB checkpoint",
    "mvdiff convert sd-v1.5-4view.pt models/mvdream-sd15 --original-config sd-v1.5-4view": "needs the official checkpoint",
    "mvdiff convert unet.safetensors models/unet-only --unet-only --original-config my.yaml": "placeholder file names (unet.safetensors, my.yaml)",
    "mvdiff render assets/ more/model.glb --output data/mv --views 32 --resolution 256 "
    "--samples 32": "placeholder inputs (assets/, more/model.glb); rendering runs in "
    "tests/test_render_bpy.py and the quickstart",
    "mvdiff render --objaverse-lvis chair --objaverse-mirror https://my-mirror/ --output "
    "s3://bucket/mv --captions Cap3D_automated_Objaverse.csv --workers 32": "network (an Objaverse mirror, S3); tests/test_cloud.py and the objaverse_mirror "
    "fixture cover both",
    "mvdiff render ... --backend ray --ray-address auto": "placeholder (...) and a Ray cluster",
    "python data_prep/laion_subset.py --config data_prep/configs/laion_subset.yaml --set "
    "input='/data/laion/*.parquet' --set output_dir=/data/laion-256": "downloads LAION images (network); tests/test_data_laion.py runs it on local files",
    "accelerate launch --config_file train/accelerate/ddp_8gpu.yaml train/train.py --config "
    "train/configs/mvdream_sd21.yaml --set model.pretrained=/models/stable-diffusion-2-1-base "
    "--set data.mv_shards='/data/mv/mv-{000000..000999}.tar' --set "
    "data.shards_2d='/data/laion-256/{00000..00999}.tar'": "8 GPUs and Stable Diffusion 2.1",
    'mvdiff sample --model runs/mvdream-sd21/model --prompt "a bulldozer" --output '
    "out/bulldozer": "needs a trained SD-2.1-size model (GPU)",
    'mvdiff sample --model sd-v2.1-base-4view.pt --prompt "a corgi" --scheduler dpm --steps '
    "20 --output out/corgi": "needs the official 5 GB checkpoint",
    "mvdiff sample --settings out/corgi/settings.json --output out/corgi-again": "replays the corgi sample above (official checkpoint)",
    "mvdiff convert sd-v2.1-base-4view-ipmv.pt models/imagedream": "needs the official "
    "ImageDream checkpoint",
    "mvdiff sample --model models/imagedream --image photo.png --output out/photo": "needs the ImageDream checkpoint",
    "mvdiff train --config train/configs/imagedream_sd21.yaml --set "
    "model.pretrained=models/mvdream-sd21 --set image.encoder=models/imagedream --set "
    "data.mv_shards='data/mv/mv-{000000..000999}.tar'": "needs converted official MVDream and "
    "ImageDream models and a GPU; tests/test_image_train.py trains the mode with tiny parts",
    "mvdiff text-to-3d --image photo.png --model models/imagedream --output out/photo-3d": "needs the ImageDream checkpoint; tests/test_image_train.py runs the alias",
    'mvdiff dreambooth --model models/mvdream-sd21 --images photos/my_dog --prompt "a sks '
    'dog" --output runs/sks-dog --lora --prior': "needs the SD-2.1-size model and a GPU; the "
    "tiny try-out below runs",
    'mvdiff sample --model runs/sks-dog/adapter --prompt "a sks dog" --output samples/sks-dog': "needs the DreamBooth run above (GPU)",
    'mvdiff text-to-3d --model runs/sks-dog/adapter --prompt "a sks dog" --output '
    "assets/sks-dog": "needs the DreamBooth run above (GPU)",
    'mvdiff text-to-3d --model models/mvdream-sd21 --prompt "a wooden chair" --output '
    "out/chair": "the 24 GB GPU recipe",
    'mvdiff text-to-3d --model ... --prompt "a corgi" --ref-views out/corgi --output '
    "out/corgi-3d": "placeholder (--model ...) and the corgi sample (official checkpoint)",
    "mvdiff image-to-3d photo.png --model models/imagedream --output out/photo-3d [--prompt "
    '"..."] [--elevation 0] [--fov 40] [--depth depth.png]': "a usage line ([optional] flags) and the ImageDream checkpoint",
    'mvdiff sample --model runs/mvdream/model --prompt "a red cube with a blue front" '
    "--output samples/cube": "needs a trained model at runs/mvdream/model",
    "mvdiff render assets/cube.glb --cameras-from samples/cube --output renders": "needs the sample above and an asset assets/cube.glb",
    "mvdiff eval samples/ --output eval/ --gt renders/mv-000000.tar [--clip "
    "path/to/clip-folder] [--inception path/to/inception-torchscript.pt]": "a usage line ([optional] flags) on the sample above",
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": "cloud credentials",
    "mvdiff render assets/ --output s3://bucket/mv --work-dir /scratch/mv": "S3 (network, credentials); tests/test_cloud.py runs it against a local S3 server",
    "mvdiff train --config train/configs/mvdream_sd21.yaml --output runs/mv --set "
    "data.mv_shards='s3://bucket/mv/mv-{000000..000999}.tar'": "S3 and the SD-2.1 recipe (GPU)",
}

#: text-to-3D at 10 steps; the export decimates the barely fitted field's noisy mesh to 2000
#: faces before its UV atlas and bakes a 256² texture (at the presets' 20000 faces and 512²
#: these two commands took 12.7 and 17.4 s CPU, here 5.9 and 11.4 s)
TINY_3D = "--set steps=10 --set mesh_faces=2000 --set texture_size=256"

#: command -> {"tiny": extra arguments that shrink the budget, "proposed": True for wording
#: suggested for README (may be absent there)}
RUN = {
    # README's first command: run once per session by the quickstart_run fixture
    "mvdiff quickstart --output outputs/quickstart": {"fixture": True},
    "mvdiff train --config train/configs/tiny_cpu.yaml --steps 50": {},
    "mvdiff train --config train/configs/tiny_cpu.yaml --steps 60 --resume latest": {},
    "mvdiff shard-info data/mv --contact-sheet sheet.png": {},
    # the DreamBooth try-out (its three commands share the scratch folder)
    'python -c "\nfrom pathlib import Path; from PIL import Image\ncat = '
    "Image.open('mvdiff/resources/photos/chelsea.jpg'); "
    "Path('tryout/cat').mkdir(parents=True, exist_ok=True)\nfor i, x in enumerate((0, 32, "
    "64)): cat.crop((x, 0, x + 128, 128)).save(f'tryout/cat/{i}.jpg')\"": {},
    "mvdiff dreambooth --config train/configs/dreambooth_tiny_cpu.yaml --model tiny --images "
    'tryout/cat --prompt "a photo of sks cat" --output tryout/db-tiny --lora --prior': {},
    "mvdiff sample --model tryout/db-tiny/adapter --prompt 'a photo of sks cat' --output "
    "tryout/db-tiny/sample --height 32 --width 32": {},
    "mvdiff text-to-3d --ref-views data/mv/mv-000000.tar --sds-weight 0 --config "
    "infer/configs/reconstruct_cpu.yaml --output out/recon": {"tiny": TINY_3D},
    'mvdiff text-to-3d --model outputs/quickstart/train/model --prompt "a red cube" --fast '
    "--output out/quick": {"tiny": TINY_3D},
}


# ---- reading README -------------------------------------------------------------------------
def split_commands(block: str) -> list[str]:
    """Commands of a ```bash block: lines joined over ``\\`` continuations and open quotes,
    comment lines and trailing ``# ...`` comments dropped, ``&&`` chains split."""
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " " + line.strip()
        elif pending:
            pending += "\n" + line
        else:
            pending = line.strip()
        if pending.endswith("\\"):
            continue
        try:
            lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            list(lexer)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.extend(_split_chain(_drop_comment(pending)))
        pending = ""
    assert not pending, f"README: unfinished command {pending!r}"
    return commands


def _drop_comment(command: str) -> str:
    """The command without a trailing ``# comment`` (a ``#`` outside quotes after a space)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i and command[i - 1].isspace():
            return command[:i].rstrip()
    return command.rstrip()


def _split_chain(command: str) -> list[str]:
    """``a && b`` -> [a, b] (``&&`` outside quotes)."""
    parts, quote, start = [], None, 0
    i = 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif command.startswith("&&", i):
            parts.append(command[start:i].strip())
            start = i + 2
            i += 1
        i += 1
    parts.append(command[start:].strip())
    return [p for p in parts if p]


def readme_blocks(text: str) -> list[list[str]]:
    """The commands of every ```bash block, in order."""
    blocks, inside, lines = [], False, []
    for line in text.splitlines():
        if not inside and line.strip() == "```bash":
            inside, lines = True, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append(split_commands("\n".join(lines)))
        elif inside:
            lines.append(line)
    return blocks


def _normalise(command: str) -> str:
    """Listing key: shell words joined by single spaces (quotes as written)."""
    out, quote, word = [], None, ""
    for ch in command:
        if quote:
            word += ch
            quote = None if ch == quote else quote
        elif ch in "'\"":
            word += ch
            quote = ch
        elif ch.isspace():
            if word:
                out.append(word)
            word = ""
        else:
            word += ch
    if word:
        out.append(word)
    return " ".join(out)


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
COMMANDS = [_normalise(c) for block in BLOCKS for c in block]
SKIP_KEYS = {_normalise(k): v for k, v in SKIP.items()}
RUN_KEYS = {_normalise(k): v for k, v in RUN.items()}


# ---- the tests ------------------------------------------------------------------------------
def test_the_readme_parser_reads_continuations_quotes_comments_and_chains():
    block = (
        "# a comment\n"
        "pip install x && mvdiff a --b c   # trailing\n"
        "mvdiff d \\\n    --e 'f # g' \\\n    --h\n"
        'python -c "\nprint(1)\nprint(2)"\n'
    )
    assert split_commands(block) == [
        "pip install x",
        "mvdiff a --b c",
        "mvdiff d --e 'f # g' --h",
        'python -c "\nprint(1)\nprint(2)"',
    ]
    assert _normalise("a   b\n 'c  d'") == "a b 'c  d'"


def test_every_readme_command_is_run_or_listed():
    assert BLOCKS and COMMANDS, "README has no ```bash blocks"
    unknown = [c for c in COMMANDS if c not in SKIP_KEYS and c not in RUN_KEYS]
    assert not unknown, (
        "README commands neither run nor listed in tests/test_readme.py (add each to RUN, or "
        f"to SKIP with the reason): {unknown}"
    )
    both = sorted(set(SKIP_KEYS) & set(RUN_KEYS))
    assert not both, f"listed as both run and skipped: {both}"
    stale = [k for k in SKIP_KEYS if k not in COMMANDS]
    stale += [k for k, v in RUN_KEYS.items() if k not in COMMANDS and not v.get("proposed")]
    assert not stale, f"listed in tests/test_readme.py but no longer in README: {stale}"
    assert all(reason.strip() for reason in SKIP.values())


def _scratch(quickstart_run, tmp_path: Path) -> tuple[Path, dict]:
    """A folder where README's relative paths resolve; the environment the commands see
    (``mvdiff`` and ``python``: this interpreter and this checkout)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("train", "infer", "data_prep", "mvdiff", "tests"):
        (cwd / name).symlink_to(ROOT / name)
    (cwd / "outputs").mkdir()
    (cwd / "outputs" / "quickstart").symlink_to(quickstart_run.out)
    (cwd / "data").mkdir()
    (cwd / "data" / "mv").symlink_to(quickstart_run.out / "renders")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("mvdiff", f'exec {sys.executable} -m mvdiff.cli "$@"\n'),
                       ("python", f'exec {sys.executable} "$@"\n')):  # fmt: skip
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")  # fmt: skip
    return cwd, env


RUN_BLOCKS = [
    (i, [c for c in block if _normalise(c) in RUN_KEYS])
    for i, block in enumerate(BLOCKS)
    if any(_normalise(c) in RUN_KEYS and not RUN_KEYS[_normalise(c)].get("fixture") for c in block)
]


@pytest.mark.slow
@pytest.mark.parametrize("index, commands", RUN_BLOCKS, ids=[f"block{i}" for i, _ in RUN_BLOCKS])
def test_readme_block_runs(index, commands, quickstart_run, tmp_path):
    """The runnable commands of one README block, in order, in one scratch folder."""
    assert quickstart_run.proc.returncode == 0, quickstart_run.proc.stderr[-2000:]
    cwd, env = _scratch(quickstart_run, tmp_path)
    for command in commands:
        spec = RUN_KEYS[_normalise(command)]
        if spec.get("fixture"):
            continue  # run by the quickstart_run fixture, exactly as written
        line = command + (f" {spec['tiny']}" if spec.get("tiny") else "")
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"README block {index}: {line}\n{proc.stderr[-3000:]}"


def test_tiny_train_without_the_quickstart_says_to_run_it(tmp_path):
    """README's tiny training run names the data the quickstart writes: without it, one line
    saying to run the quickstart first (was: "no training data")."""
    (tmp_path / "train").symlink_to(ROOT / "train")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", "train", "--config", "train/configs/tiny_cpu.yaml",
         "--steps", "50"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0, err
    assert "mvdiff quickstart --output outputs/quickstart" in err
    assert "outputs/quickstart/renders/mv-*.tar" in err
    assert not (tmp_path / "runs").exists()  # nothing written
