"""``mvdiff shard-info``: counts and a schema check of multi-view shards (+ a contact sheet)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard-info",
        help="count samples in multi-view shards and check them against the schema",
        description="Print per-shard sample and view counts, check every sample against the "
        "multi-view shard schema (docs/design.md §3) and, with --contact-sheet, write a PNG grid of "
        "some samples. Exit status 1 if any shard has problems, 2 on bad arguments.",
    )
    p.add_argument("shards", nargs="+", metavar="SHARD", help="shard .tar files or folders of them")
    p.add_argument("--contact-sheet", metavar="PNG", help="write a grid of samples x views here")
    p.add_argument("--max-samples", type=int, default=8, help="rows of the contact sheet")
    p.add_argument("--max-views", type=int, default=8, help="columns of the contact sheet")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mvdiff.errors import UserError
    from mvdiff.render.shards import check_shard, contact_sheet

    paths = []
    for item in args.shards:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.glob("*.tar") if q.is_file())  # no FIFOs, folders
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"shard {item}: no such file or folder")
    if not paths:
        raise UserError(f"no .tar shards in {' '.join(args.shards)}")
    if args.contact_sheet and Path(args.contact_sheet).suffix.lower() != ".png":
        raise UserError(f"--contact-sheet {args.contact_sheet}: must be a .png file")
    reports = [check_shard(p) for p in paths]
    total = {
        "shards": len(reports),
        "samples": sum(r["samples"] for r in reports),
        "views": sum(r["views"] for r in reports),
        "errors": sum(len(r["errors"]) for r in reports),
    }
    if args.contact_sheet:
        total["contact_sheet"] = args.contact_sheet
        try:
            total["contact_sheet_rows"] = contact_sheet(
                paths, args.contact_sheet, args.max_samples, args.max_views
            )
        except OSError as e:
            raise UserError(f"--contact-sheet {args.contact_sheet}: cannot write ({e})") from None
    if args.json:
        print(json.dumps({**total, "reports": reports}))
    else:
        for r in reports:
            status = "ok" if not r["errors"] else f"{len(r['errors'])} problem(s)"
            path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in r["path"])
            print(f"{path}: {r['samples']} samples, {r['views']} views, {status}")
            for err in r["errors"][:20]:
                print(f"  {err}")
        print(f"total: {total['shards']} shards, {total['samples']} samples, {total['views']} views, "
              f"{total['errors']} problem(s)")  # fmt: skip
    return 1 if total["errors"] else 0
