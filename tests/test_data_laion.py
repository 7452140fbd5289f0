"""LAION subset recipe: parquet (LAION columns) -> filters -> img2dataset from loopback -> reader."""

from __future__ import annotations

import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("img2dataset")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")


def _load_recipe():
    return load_script(ROOT / "data_prep" / "laion_subset.py", "laion_subset")


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_filters_report_missing_columns():
    recipe = _load_recipe()
    df = pd.DataFrame(
        {"url": ["a", "b", None], "WIDTH": [300, 100, 300], "HEIGHT": [300, 300, 300]}
    )
    cfg = recipe.LaionSubsetConfig(min_size=256, max_aspect=2.0)
    kept, report = recipe.filter_metadata(df, cfg)
    assert kept["url"].tolist() == ["a"]
    skipped = {r["filter"].split()[0] for r in report if r["removed"] == "skipped: no column"}
    assert {"watermark", "unsafe", "NSFW"} <= skipped


@pytest.mark.slow  # img2dataset start-up (imports, process pool) dominates: ~30 s
def test_laion_subset_downloads_filtered_rows_into_readable_shards(server, tmp_path):
    recipe = _load_recipe()
    root, base = server
    rows = []
    rng = np.random.default_rng(0)
    # (name, width, height, pwatermark, punsafe, NSFW, aesthetic, expect kept)
    spec = [
        ("good0", 300, 280, 0.1, 0.1, "UNLIKELY", 6.0, True),
        ("good1", 320, 300, 0.2, 0.0, "UNLIKELY", 5.5, True),
        ("good2", 280, 260, 0.0, 0.2, "UNLIKELY", 7.0, True),
        ("small", 100, 90, 0.1, 0.1, "UNLIKELY", 6.0, False),
        ("wide", 900, 300, 0.1, 0.1, "UNLIKELY", 6.0, False),
        ("watermark", 300, 300, 0.9, 0.1, "UNLIKELY", 6.0, False),
        ("unsafe", 300, 300, 0.1, 0.9, "NSFW", 6.0, False),
        ("ugly", 300, 300, 0.1, 0.1, "UNLIKELY", 3.0, False),
    ]
    for name, w, h, wm, un, tag, aes, _ in spec:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG")
        (root / f"{name}.jpg").write_bytes(buf.getvalue())
        rows.append({"URL": f"{base}/{name}.jpg", "TEXT": f"caption {name}", "WIDTH": w,
                     "HEIGHT": h, "pwatermark": wm, "punsafe": un, "NSFW": tag,
                     "AESTHETIC_SCORE": aes})  # fmt: skip
    # passes the metadata filters but is not served (404): counted as a failed download
    rows.append({"URL": f"{base}/missing.jpg", "TEXT": "caption missing", "WIDTH": 300,
                 "HEIGHT": 300, "pwatermark": 0.0, "punsafe": 0.0, "NSFW": "UNLIKELY",
                 "AESTHETIC_SCORE": 9.0})  # fmt: skip
    parquet = tmp_path / "meta.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    out = tmp_path / "laion"
    cfg = recipe.LaionSubsetConfig(input=str(parquet), output_dir=str(out), min_size=256,
                                   max_aspect=2.0, min_aesthetic=5.0, processes=1, threads=4,
                                   timeout=5, retries=0)  # fmt: skip
    summary = recipe.run(cfg)
    assert summary["kept"] == 4 and summary["downloaded"] == 3
    assert (out / "config.yaml").is_file() and (out / "laion_subset_report.json").is_file()

    from mvdiff.data import DataConfig, build_loader

    data = DataConfig(shards_2d=str(out / "*.tar"), resolution=64, min_size_2d=256,
                      batch_size_2d=1, num_workers=0)  # fmt: skip
    captions = sorted(c for b in build_loader(data, "2d", epochs=1) for c in b["caption"])
    assert captions == ["caption good0", "caption good1", "caption good2"]
