"""Library code logs (module loggers) and never prints or configures logging; only the CLI
sets logging up; library code draws from explicit generators and leaves the caller's
global RNG alone; only public webdataset/torch APIs (Winograd, which needs a private torch
op, is opt-in). Issue 21 item 4."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: where printing is the job: the CLI and its commands; quickstart.py is a story that prints
#: its stages (rebuilt separately); testing.py builds tiny test models
PRINTING_ALLOWED = {"cli.py", "quickstart.py"}


def library_modules():
    for path in sorted((REPO / "mvdiff").rglob("*.py")):
        rel = path.relative_to(REPO / "mvdiff")
        if rel.parts[0] == "commands" or str(rel) in PRINTING_ALLOWED:
            continue
        yield rel, ast.parse(path.read_text())


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func)


def test_library_code_never_prints_or_configures_logging():
    found = [
        f"{rel}: {name}"
        for rel, tree in library_modules()
        for name in calls(tree)
        if name in ("print", "logging.basicConfig") or name.endswith("addHandler")
    ]
    assert found == []
    defaults = [  # `log=print` default arguments
        f"{rel}: {ast.unparse(node)[:60]}"
        for rel, tree in library_modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.arguments)
        for d in node.defaults + node.kw_defaults
        if d is not None and ast.unparse(d) == "print"
    ]
    assert defaults == []


def test_only_public_webdataset_and_torch_apis():
    """No webdataset sub-module internals (tariterators.group_by_keys, filters._shuffle) and
    no private torch op outside the opt-in Winograd module."""
    bad = []
    for rel, tree in library_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("webdataset"):
                bad.append(f"{rel}: from {node.module} import ...")
            if isinstance(node, ast.Attribute):
                text = ast.unparse(node)
                root = text.split(".")[0]
                private = any(part.startswith("_") and not part.startswith("__")
                              for part in text.split(".")[1:])  # fmt: skip
                if root in ("wds", "webdataset") and (private or text.count(".") > 1):
                    bad.append(f"{rel}: {text}")
                if root == "torch" and private and str(rel) != "pipelines/winograd.py":
                    bad.append(f"{rel}: {text}")
    assert sorted(set(bad)) == []


def test_our_grouping_matches_webdataset_on_a_real_shard(tmp_path):
    """mvdiff.data.shards.group_by_keys (public-API replacement) groups members exactly as
    webdataset's own tariterators.group_by_keys does, including upper-case suffixes, folder
    prefixes, names without a dot and a key that comes back later."""
    from webdataset import tariterators

    from mvdiff.data.shards import group_by_keys, open_shards, tar_members

    names = ["a.json", "a.rgba.000.png", "d/b.JSON", "d/b.txt", "README", "c.x", "a.txt"]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = str(i).encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def members():
        return tar_members(open_shards([{"url": str(path)}]))

    ours = list(group_by_keys(members()))
    theirs = list(tariterators.group_by_keys(members()))
    assert ours == theirs and [s["__key__"] for s in ours] == ["a", "d/b", "c", "a"]


def test_fits_leave_the_global_rng_alone_and_are_seeded():
    from mvdiff.sds.config import TextTo3DConfig
    from mvdiff.sds.loop import FitState

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = FitState(TextTo3DConfig.fast(seed=5))
    assert torch.equal(torch.get_rng_state(), before)
    torch.randn(10)  # the caller's RNG moves on; the fit does not depend on it
    b = FitState(TextTo3DConfig.fast(seed=5))
    for x, y in zip(a.field.state_dict().values(), b.field.state_dict().values(), strict=True):
        assert torch.equal(x, y)


SCRIPT = r"""
import json, logging, sys
import mvdiff.training.trainer, mvdiff.sds.text_to_3d, mvdiff.pipelines.loading, mvdiff.cli
before = [len(logging.getLogger().handlers), len(logging.getLogger("mvdiff").handlers)]
from mvdiff.cli import setup_logging
setup_logging(quiet=sys.argv[1] == "quiet")
setup_logging(quiet=sys.argv[1] == "quiet")  # idempotent: one handler
log = logging.getLogger("mvdiff.sds.text_to_3d")
log.info("an info line")
log.warning("a warning line")
print(json.dumps({"before": before, "after": len(logging.getLogger("mvdiff").handlers)}))
"""


@pytest.mark.parametrize("mode", ["normal", "quiet"])
def test_only_the_cli_sets_up_logging(mode):
    """Importing the library adds no handler anywhere; the CLI's setup sends info lines to
    stdout and warnings to stderr (info hidden with --quiet), once."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         cwd=REPO, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip().splitlines()
    assert json.loads(out[-1]) == {"before": [0, 0], "after": 1}
    assert ("an info line" in out) == (mode == "normal")
    assert res.stderr.strip().splitlines()[-1] == "a warning line"
