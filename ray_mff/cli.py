"""The ``ray-mff`` command line: fuse, eval, train, export, methods."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Sequence

from ray_mff.errors import MFFError

log = logging.getLogger("ray_mff")

# Runs with at most this many stacks go through the local loop; more go through Ray Data.
RAY_THRESHOLD = 16


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="ray-mff: %(message)s",
                        stream=sys.stderr)
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):  # "Found credentials in ..."
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str]], out=None, limit: int = 60) -> None:
    """Plain fixed-width table: columns are (key, header) pairs."""
    out = out or sys.stdout
    shown = rows[:limit]
    cells = [[_fmt(r.get(k)) for k, _ in columns] for r in shown]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)), file=out)
    if len(rows) > limit:
        print(f"... {len(rows) - limit} more rows (see the manifest)", file=out)


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else float("nan")


# ----------------------------------------------------------------------------------------- fuse

def add_fuse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="folder or s3:// prefix of stacks (sub-folder per stack, or a naming pattern)")
    p.add_argument("output", help="folder or s3:// prefix for fused images and manifest.parquet")
    add_fuse_options(p)


def add_fuse_options(p: argparse.ArgumentParser) -> None:
    """Every `fuse` option but INPUT/OUTPUT (shared with jobs/nightly_fuse.py)."""
    from ray_mff.methods import default_method

    p.add_argument("--method", "--model", dest="method", default=None,
                   help=f"fusion method or model (default: {default_method()}); see `ray-mff methods`")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx", "tensorrt"],
                   help="engine for learned models (auto: TensorRT on NVIDIA GPUs, else ONNX Runtime)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--calibration", default="on", choices=["on", "off"],
                   help="stacks of >2 images: decision calibration (on) or serial pair-by-pair fusion (off)")
    p.add_argument("--pattern", default=None,
                   help="regex with named groups 'stack' and 'index' matching file names in a flat folder")
    p.add_argument("--tile-size", type=int, default=None,
                   help="fuse images with a side over twice this in tiles of this many pixels "
                        "(default: 1024 for learned models; 0 = never tile)")
    p.add_argument("--format", dest="output_format", default=None, choices=["png", "tif", "jpg"],
                   help="output format (default: PNG for 8-bit, TIFF for 16-bit/float/multichannel)")
    p.add_argument("--force", action="store_true", help="fuse again stacks that already have an output")
    p.add_argument("--save-decision-maps", action="store_true",
                   help="also write OUTPUT/decision_maps/<stack>.png (D for pairs, source index for stacks)")
    p.add_argument("--no-metrics", action="store_true", help="skip Q_G/Q_Y/Q_MI in the manifest")
    p.add_argument("--max-pixels", type=int, default=None, help="reject images with more pixels than this")
    p.add_argument("--executor", default="auto", choices=["auto", "local", "ray"],
                   help=f"local loop or Ray Data pipeline (auto: Ray for more than {RAY_THRESHOLD} stacks)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    p.add_argument("--num-actors", type=int, default=None, help="Ray: fusion actors (default: one per CPU/GPU)")
    p.add_argument("--batch-size", type=int, default=1, help="Ray: stacks per actor batch")
    p.add_argument("--ray-address", default=None, help="Ray: cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="Ray: GPUs per fusion actor (default: 1 for learned models when the cluster has GPUs, "
                        "else 0; set 1 on an autoscaling cluster whose GPU workers start at zero)")
    p.add_argument("--flush-every", type=int, default=32,
                   help="manifest part file every N finished stacks (and every 30 s): a killed run keeps what it flushed")
    p.add_argument("--retry-errors", action="store_true",
                   help="also fuse again stacks whose last error waits for a changed input (input, resource)")
    p.add_argument("--wait", action="store_true",
                   help="when another run holds OUTPUT's lease, wait for it instead of exiting with code 3")


def fuser_spec_from_args(args) -> dict:
    """Everything needed to build the fuser again inside a Ray actor."""
    from ray_mff.methods import default_method

    spec = {"name": args.method or default_method(), "engine": args.engine, "precision": args.precision,
            "calibration": args.calibration == "on"}
    if args.tile_size is not None:
        spec["tile_size"] = args.tile_size
    return spec


def run_options_from_args(args):
    from ray_mff.runner import RunOptions

    opts = RunOptions(output_format=args.output_format, save_decision_maps=args.save_decision_maps,
                      compute_metrics=not args.no_metrics, force=args.force,
                      retry_errors=getattr(args, "retry_errors", False),
                      flush_every=getattr(args, "flush_every", 32) or 32)
    if args.max_pixels:
        opts.max_pixels = args.max_pixels
    return opts


def print_run_summary(summary, out=None) -> None:
    out = out or sys.stdout
    rows = summary.rows
    for r in rows:
        r["size"] = f"{r['width']}x{r['height']}" if r.get("width") else None
    print_table(rows, [("stack_id", "stack"), ("n_images", "n"), ("size", "size"), ("method", "method"),
                       ("engine", "engine"), ("status", "status"), ("seconds", "sec"), ("q_g", "Q_G"),
                       ("q_y", "Q_Y"), ("q_mi", "Q_MI")], out=out)
    if summary.fused:
        print(f"mean over {summary.fused} fused: Q_G {_fmt(summary.mean('q_g'))}  Q_Y {_fmt(summary.mean('q_y'))}  "
              f"Q_MI {_fmt(summary.mean('q_mi'))}", file=out)
    for r in rows[:60]:
        if r["status"] != "ok":
            print(f"error [{r.get('error_kind') or 'input'}]: {r['error']}", file=out)
        elif r.get("warning"):
            print(f"warning: {r['stack_id']}: {r['warning']}", file=out)
    reasons = getattr(summary, "reasons", None) or {}
    if reasons:
        print("why fused: " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())), file=out)
    if getattr(summary, "waiting", 0):
        print(f"{summary.waiting} failed stacks wait for their input to change (--retry-errors to redo them)", file=out)
    if getattr(summary, "stopped", None):
        why = summary.stop_reason or summary.stopped
        print(f"stopped early ({why}); the rerun finishes what is missing", file=out)
    if getattr(summary, "unrecorded", 0):
        print(f"{summary.unrecorded} finished stacks could not be recorded in the manifest; the rerun redoes them",
              file=out)
    print(f"run {summary.run_id}: {summary.fused} fused, {summary.skipped} skipped, {summary.failed} failed "
          f"-> {summary.output}", file=out)


class SetupError(Exception):
    """Nothing was fused: the run could not start (exit code 2). ``str()`` is one line."""


def _same_place(a: str, b: str) -> bool:
    from ray_mff import storage

    fa, pa_ = storage.resolve(a)
    fb, pb = storage.resolve(b)
    return fa.protocol == fb.protocol and pa_.rstrip("/") == pb.rstrip("/")


def run_fuse(args):
    """Discover, plan and fuse as ``ray-mff fuse`` does; the RunSummary (None when INPUT holds no stacks).

    Before anything is fused: OUTPUT must differ from INPUT, both storages must answer (a short
    probe, so a wrong endpoint fails in seconds: :class:`ray_mff.storage.StorageUnavailable`),
    OUTPUT must be writable, and this run must get OUTPUT's lease (:class:`ray_mff.lease.LeaseHeld`).
    """
    from ray_mff import lease, manifest, storage
    from ray_mff.methods import get_fuser
    from ray_mff.runner import recipe_id, run_local
    from ray_mff.stacks import discover_stacks

    if args.s3_endpoint:
        storage.set_s3_endpoint(args.s3_endpoint)
    if _same_place(args.input, args.output):
        raise SetupError(f"{args.output}: OUTPUT is INPUT; fused images would mix with the stacks "
                         f"(use a sub-folder such as {storage.join_uri(args.input, 'fused')})")
    storage.probe(args.input)
    stacks = _outside(discover_stacks(args.input, pattern=args.pattern), args.output)
    if not stacks:
        return None
    storage.probe(args.output, write=True)  # after discovery: a new OUTPUT inside INPUT is no empty stack
    spec = fuser_spec_from_args(args)
    opts = run_options_from_args(args)
    opts.recipe_id = recipe_id(spec, opts)
    executor = args.executor
    if executor == "auto":
        executor = "ray" if len(stacks) > RAY_THRESHOLD else "local"
    log.info("%d stacks in %s; method %s; executor %s", len(stacks), args.input, spec["name"], executor)
    run_id = manifest.new_run_id()
    with lease.acquire(args.output, run_id, wait=getattr(args, "wait", False)) as held:
        if executor == "ray":
            from ray_mff.pipeline import run_pipeline

            opts.lease_uri, opts.lease_token = held.uri, held.token
            return run_pipeline(stacks, spec, args.output, opts, run_id=run_id, num_actors=args.num_actors,
                                batch_size=args.batch_size, ray_address=args.ray_address,
                                s3_endpoint=args.s3_endpoint, num_gpus_per_actor=args.gpus_per_actor,
                                flush_every=args.flush_every)
        return run_local(stacks, lambda: get_fuser(**spec), args.output, opts, run_id=run_id)


def _outside(stacks: list, output_root: str) -> list:
    """Leave out stacks inside OUTPUT, for when OUTPUT lies under INPUT (``s3://a`` -> ``s3://a/fused``):
    our own fused images and manifest parts are not new stacks to fuse every night."""
    from ray_mff import storage

    out_fs, out_path = storage.resolve(output_root)
    inside = out_path.rstrip("/") + "/"

    def is_output(uri: str) -> bool:
        fs, path = storage.resolve(uri)
        return fs.protocol == out_fs.protocol and path.startswith(inside)

    return [s for s in stacks if not (s.uris and all(is_output(u) for u in s.uris))]


def cmd_fuse(args) -> int:
    from ray_mff.runner import install_signal_handlers

    install_signal_handlers()
    summary = run_fuse(args)
    if summary is None:
        print(f"ray-mff: {args.input}: no stacks found", file=sys.stderr)
        return 2
    print_run_summary(summary)
    return summary.exit_code


# ----------------------------------------------------------------------------------------- eval

def cmd_eval(args) -> int:
    from ray_mff import io, metrics, storage
    from ray_mff.stacks import discover_stacks

    if args.s3_endpoint:
        storage.set_s3_endpoint(args.s3_endpoint)
    fused_files = _index_by_stem([e.uri for e in storage.list_files(args.fused)])
    truth_files = _index_by_stem([e.uri for e in storage.list_files(args.truth)]) if args.truth else {}
    rows = []
    for stack in discover_stacks(args.src, pattern=args.pattern):
        row = {"stack_id": stack.id, "n_images": len(stack.uris)}
        fused_uri = fused_files.get(stack.id)
        if fused_uri is None or stack.meta.get("error") or len(stack.uris) < 2:
            row["error"] = "no fused image" if fused_uri is None else (stack.meta.get("error") or "one image")
            rows.append(row)
            continue
        try:
            sources = io.read_stack(stack.uris)
            fused = io.read_image(fused_uri)
            truth = io.read_image(truth_files[stack.id]) if stack.id in truth_files else None
            row.update(metrics.evaluate(sources, fused, truth=truth))
        except Exception as err:  # report and carry on: eval is a read-only survey
            row["error"] = str(err)
        rows.append(row)
    keys = ["q_g", "q_y", "q_mi", "q_cb"] + (["psnr", "ssim"] if truth_files else [])
    scored = [r for r in rows if "error" not in r]
    mean = {"stack_id": "MEAN", "n_images": len(scored), **{k: _mean(scored, k) for k in keys}}
    if args.json:
        json.dump({"stacks": rows, "mean": mean}, sys.stdout, indent=2, default=float)
        print()
    else:
        cols = [("stack_id", "stack"), ("n_images", "n")] + [(k, k.upper().replace("Q_", "Q_")) for k in keys]
        print_table(rows + [mean], cols, limit=10_000)
        for r in rows:
            if "error" in r:
                print(f"skipped {r['stack_id']}: {r['error']}")
    return 0 if scored else 1


def _index_by_stem(uris: Sequence[str]) -> dict[str, str]:
    out = {}
    for uri in uris:
        name = uri.rsplit("/", 1)[-1]
        stem, dot, ext = name.rpartition(".")
        if dot and ext.lower() in ("png", "tif", "tiff", "jpg", "jpeg"):
            out.setdefault(stem, uri)
    return out


# ----------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-mff", description="Multi-focus image fusion at archive scale.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fuse", help="fuse every stack under INPUT into OUTPUT",
                       description="Fuse every focus stack under INPUT; write OUTPUT/<stack>.<ext> and "
                                   "OUTPUT/manifest.parquet. Reruns do only what is missing.")
    add_fuse_arguments(p)
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("eval", help="score fused images against their sources (and ground truth)",
                       description="Q_G, Q_Y, Q_MI, Q_CB of FUSED/<stack>.* against the stacks in SRC; "
                                   "PSNR/SSIM when --truth holds <stack>.* all-in-focus images.")
    p.add_argument("src")
    p.add_argument("fused")
    p.add_argument("--truth", default=None, help="folder of all-in-focus ground truth named <stack>.<ext>")
    p.add_argument("--pattern", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--s3-endpoint", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("methods", help="list fusion methods and models")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("manifest", help="manifest maintenance: compact",
                       description="compact: merge OUTPUT/manifest.parquet's part files into one sorted file")
    p.add_argument("action", choices=["compact"])
    p.add_argument("output")
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--wait", action="store_true", help="wait for a run that holds OUTPUT's lease")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("report", help="one HTML page about OUTPUT: counts, failures, slowest, thumbnails",
                       description="Write OUTPUT/report.html (or --out): counts, failures grouped by reason, "
                                   "the slowest and lowest-scoring stacks, thumbnails of fused images and "
                                   "decision maps.")
    p.add_argument("output")
    p.add_argument("--out", default=None, help="where to write the page (default: OUTPUT/report.html)")
    p.add_argument("--thumbnails", type=int, default=24, help="how many stacks to show as thumbnails")
    p.add_argument("--s3-endpoint", default=None)
    p.set_defaults(func=cmd_report)

    from ray_mff.export import add_export_arguments, cmd_export
    from ray_mff.train.trainer import add_train_arguments, cmd_train

    p = sub.add_parser("train", help="train a fusion model with Ray Train")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a model to ONNX (and TensorRT engines on GPU nodes)")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)
    return parser


def cmd_manifest(args) -> int:
    from ray_mff import lease, manifest, storage

    if args.s3_endpoint:
        storage.set_s3_endpoint(args.s3_endpoint)
    storage.probe(args.output, write=True)
    with lease.acquire(args.output, "compact-" + manifest.new_run_id(), wait=args.wait):
        merged, uri = manifest.compact(args.output)
    print(f"{merged} manifest files -> {uri or 'nothing to compact'}")
    return 0


def cmd_report(args) -> int:
    from ray_mff import storage
    from ray_mff.report import write_report

    if args.s3_endpoint:
        storage.set_s3_endpoint(args.s3_endpoint)
    uri = write_report(args.output, out=args.out, thumbnails=args.thumbnails)
    print(uri)
    return 0


def cmd_methods(args) -> int:
    from ray_mff.methods import CLASSICAL_METHODS, default_method, list_methods

    for name in list_methods():
        kind = "classical" if name in CLASSICAL_METHODS else "learned"
        print(f"{name:10s} {kind}{'  (default)' if name == default_method() else ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from ray_mff.lease import LeaseHeld

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ray-mff: interrupted; rerun to finish what is missing", file=sys.stderr)
        return 130
    except LeaseHeld as err:
        print(f"ray-mff: {err} (exit 3; --wait queues behind it)", file=sys.stderr)
        return 3
    except (MFFError, ValueError, OSError, SetupError) as err:
        if args.verbose:
            raise
        print(f"ray-mff: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
