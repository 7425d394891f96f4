"""``ray-mff report OUTPUT``: the morning check as one self-contained HTML page.

What it shows, all from ``OUTPUT/manifest.parquet`` (newest row per stack) and the images it names:

- counts: stacks, ok, failed (by ``error_kind``), runs, the last run and when it finished;
- failures grouped by reason (the error text without the file name), with a few example stacks;
- the slowest and the lowest-scoring (Q_G) stacks;
- thumbnails of fused images beside their decision maps (lowest-scoring first, then the rest),
  embedded as PNG data so the page can be mailed or opened from an object store.

Next to the page it writes ``report.png``, the same thumbnails as one contact sheet.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import math
import re
from collections import Counter, defaultdict

import numpy as np

from ray_mff import io, manifest, storage

THUMB = 160


def _reason(error: str | None) -> str:
    """An error without the file it names (``"<uri>: <reason>"``) and with numbers generalised,
    so one reason groups many stacks."""
    text = (error or "").strip()
    head, sep, tail = text.partition(": ")
    if sep and ("/" in head or "." in head or "\\" in head):
        text = tail
    text = re.sub(r"/\S+", "<file>", text)
    return re.sub(r"\d+", "N", text)[:200] or "(no message)"


def _thumb(uri: str | None) -> np.ndarray | None:
    if not uri:
        return None
    import cv2

    try:
        img = io.read_image(uri)
    except Exception:  # noqa: BLE001 - a missing image shows as a blank tile
        return None
    if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
        img = img[..., :3] if img.shape[2] > 3 else img[..., :1]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    img = img.astype(np.float32)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    img = np.zeros_like(img) if hi <= lo else (img - lo) * (255.0 / (hi - lo))
    img = img.astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    h, w = img.shape[:2]
    scale = THUMB / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _png_data(img: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(io.encode_image(img, "png")).decode()


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4f}"
        return html.escape("-" if v is None else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _contact_sheet(tiles: list[tuple[str, np.ndarray | None, np.ndarray | None]]) -> np.ndarray:
    """Rows of (fused | decision map) pairs with the stack id written above, 3 pairs per row."""
    import cv2

    per_row, label_h, pad = 3, 18, 6
    cell_w, cell_h = 2 * THUMB + pad, THUMB + label_h
    rows = max(1, math.ceil(len(tiles) / per_row))
    sheet = np.full((rows * (cell_h + pad) + pad, per_row * (cell_w + pad) + pad, 3), 255, np.uint8)
    for i, (name, fused, dmap) in enumerate(tiles):
        y0 = pad + (i // per_row) * (cell_h + pad)
        x0 = pad + (i % per_row) * (cell_w + pad)
        cv2.putText(sheet, name[:40], (x0, y0 + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        for j, img in enumerate((fused, dmap)):
            if img is None:
                continue
            x = x0 + j * (THUMB + pad)
            h, w = img.shape[:2]
            sheet[y0 + label_h:y0 + label_h + h, x:x + w] = img
    return sheet


def write_report(output_root: str, *, out: str | None = None, thumbnails: int = 24, top: int = 10) -> str:
    """Write the report page for ``output_root``; returns its uri (default ``OUTPUT/report.html``)."""
    latest = manifest.latest_table(output_root).to_pylist()
    if not latest:
        raise FileNotFoundError(f"{manifest.manifest_uri(output_root)}: no manifest rows to report on")
    runs = manifest.read_manifest(output_root, ["run_id", "finished_at"]).to_pylist()
    ok = [r for r in latest if r["status"] == manifest.STATUS_OK]
    bad = [r for r in latest if r["status"] != manifest.STATUS_OK]
    kinds = Counter(r.get("error_kind") or "input" for r in bad)
    last = max(runs, key=lambda r: (r["finished_at"] or dt.datetime.min.replace(tzinfo=dt.timezone.utc)))

    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in bad:
        groups[(r.get("error_kind") or "input", _reason(r.get("error")))].append(r["stack_id"])
    failures = [{"kind": k, "reason": why, "stacks": len(ids), "examples": ", ".join(ids[:3])}
                for (k, why), ids in sorted(groups.items(), key=lambda kv: -len(kv[1]))]

    def num(r, key):
        v = r.get(key)
        return v if isinstance(v, (int, float)) and not math.isnan(v) else None

    for r in latest:
        r["size"] = f"{r['width']}x{r['height']}" if r.get("width") else None
    slowest = sorted((r for r in latest if num(r, "seconds") is not None), key=lambda r: -r["seconds"])[:top]
    scored = sorted((r for r in ok if num(r, "q_g") is not None), key=lambda r: r["q_g"])
    lowest = scored[:top]

    shown = list(dict.fromkeys([r["stack_id"] for r in lowest] + [r["stack_id"] for r in ok]))[:thumbnails]
    by_id = {r["stack_id"]: r for r in latest}
    tiles = [(sid, _thumb(by_id[sid].get("output_uri")), _thumb(by_id[sid].get("decision_map_uri"))) for sid in shown]

    cols = [("stack_id", "stack"), ("n_images", "n"), ("size", "size"), ("method", "method"),
            ("engine", "engine"), ("seconds", "sec"), ("q_g", "Q_G"), ("q_y", "Q_Y"), ("q_mi", "Q_MI")]
    figs = "".join(
        f"<figure><figcaption>{html.escape(sid)} (Q_G {by_id[sid].get('q_g') or float('nan'):.3f})</figcaption>"
        + (f"<img src='{_png_data(f)}' alt='fused'>" if f is not None else "<span class='none'>no image</span>")
        + (f"<img src='{_png_data(d)}' alt='decision map'>" if d is not None else "")
        + "</figure>" for sid, f, d in tiles)
    kinds_text = ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "none"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ray-mff report: {html.escape(output_root)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} th{{background:#f3f3f3}}
.counts span{{display:inline-block;margin-right:2em;font-size:18px}} .bad{{color:#b00}} .ok{{color:#070}}
figure{{display:inline-block;margin:0 12px 12px 0}} figure img{{margin-right:4px;border:1px solid #ddd}}
figcaption{{font-size:12px}}</style></head><body>
<h1>ray-mff report</h1><p>{html.escape(output_root)}: generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC};
last run {html.escape(str(last['run_id']))} finished {last['finished_at']:%Y-%m-%d %H:%M UTC}; {len({r['run_id'] for r in runs})} runs,
{len(runs)} manifest rows.</p>
<p class="counts"><span>{len(latest)} stacks</span><span class="ok">{len(ok)} ok</span>
<span class="bad">{len(bad)} failed ({html.escape(kinds_text)})</span></p>
<h2>Failures by reason</h2>{_table(failures, [("kind", "kind"), ("reason", "reason"), ("stacks", "stacks"),
                                               ("examples", "examples")]) if failures else "<p>none</p>"}
<h2>Lowest Q_G</h2>{_table(lowest, cols)}
<h2>Slowest</h2>{_table(slowest, cols)}
<h2>Fused images and decision maps</h2><p>lowest-scoring first; white = first source in focus
(pairs), source index (stacks)</p>{figs}
</body></html>"""
    target = out or storage.join_uri(output_root, "report.html")
    storage.write_bytes_atomic(target, page.encode())
    sheet_uri = re.sub(r"\.html?$", "", target) + ".png"
    io.write_image(sheet_uri, _contact_sheet(tiles))
    return target
