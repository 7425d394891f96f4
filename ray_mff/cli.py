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

# --executor auto without a cluster: Ray's start-up (~10-20 s: a local instance, worker processes,
# each loading the method) pays off only when the run's CPU time, spread over this many cores or
# more, saves more than that. Rough CPU seconds per stack on one core (a 520x520 pair, scored).
RAY_MIN_CORES = 4
RAY_MIN_SAVING_S = 60.0
_SECONDS_PER_STACK = {"classical": 0.3, "learned": 3.0}


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message, not as it was when logging was set up
    (the CLI run in-process after a test captured and closed stderr must not log to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="ray-mff: %(message)s",
                        handlers=[_StderrHandler()])
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
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="weights file (.safetensors from `jobs/train.py`) for a learned --method: a local path "
                        "or an s3:// URI (fetched once per node); default: the weights shipped in the package")
    p.add_argument("--calibration", default="on", choices=["on", "off"],
                   help="stacks of >2 images: decision calibration (on) or serial pair-by-pair fusion (off)")
    p.add_argument("--correction", default="off", choices=["on", "off"],
                   help="stack-native models (stacknet, stacknet_s): add the fused-result branch's boundary "
                        "correction (on) or fuse with the decision alone (off, faster; scores higher with the "
                        "shipped weights: see the model card)")
    p.add_argument("--pattern", default=None,
                   help="regex with named groups 'stack' and 'index' matching file names in a flat folder")
    p.add_argument("--tile-size", type=int, default=None,
                   help="fuse images with a side over twice this in tiles of this many pixels "
                        "(default: 1024 for learned models; 0 = never tile)")
    p.add_argument("--format", dest="output_format", default=None,
                   choices=["png", "tif", "jpg", "ome-tiff", "ome-zarr"],
                   help="output format (default: a single-file stack keeps its family: OME-TIFF, ImageJ or plain "
                        "TIFF, OME-Zarr; a folder stack gives PNG for 8-bit, TIFF for 16-bit/float/multichannel)")
    p.add_argument("--force", action="store_true", help="fuse again stacks that already have an output")
    p.add_argument("--z-axis", default="auto",
                   help="single-file stacks: the focus axis (a letter of the file's axes: Z, Q, T...), 'auto' "
                        "(Z if labelled; unlabelled pages as Z, with a warning) or 'none' (the file is one image)")
    p.add_argument("--stack-per-file", action="store_true",
                   help="every image file is a stack of its own (multi-page TIFF z-stacks); .ome.tif, .zarr, "
                        ".czi/.nd2/.lif always are")
    p.add_argument("--depth-map", action="store_true",
                   help="also write <stack>_depth.tif (plane index), <stack>_height.tif (z spacing known) "
                        "and a <stack>_depth.png preview")
    p.add_argument("--save-decision-maps", action="store_true",
                   help="also write OUTPUT/decision_maps/<stack>.png (D for pairs, source index for stacks)")
    p.add_argument("--no-metrics", action="store_true", help="skip Q_G/Q_Y/Q_MI in the manifest")
    p.add_argument("--max-pixels", type=int, default=None, help="reject images with more pixels than this")
    add_align_options(p)
    p.add_argument("--executor", default="auto", choices=["auto", "local", "ray"],
                   help="local loop or Ray Data pipeline (auto: Ray when a cluster is given or running, "
                        "else the local loop unless the run is big enough to pay for Ray on a multi-core machine)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="Ray: a fixed number of fusion actors (sets --min-actors and --max-actors)")
    p.add_argument("--min-actors", type=int, default=None, help="Ray: fusion actors to start with (default 1)")
    p.add_argument("--max-actors", type=int, default=None,
                   help="Ray: most fusion actors; the pool grows to it while work is queued, and on an "
                        "autoscaling cluster asking for more GPU actors than are up adds GPU nodes "
                        "(default: one per GPU or CPU the cluster has now)")
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


def add_align_options(p: argparse.ArgumentParser) -> None:
    """The align stage's options (``fuse``, and ``eval`` to score against the same aligned sources)."""
    p.add_argument("--align", default="none", choices=["none", "translation", "similarity", "affine"],
                   help="register every plane to a reference plane before fusing (default: none)")
    p.add_argument("--align-reference", default="middle", choices=["middle", "chain"],
                   help="register to the middle plane, or neighbour to neighbour towards it (long sweeps)")
    p.add_argument("--align-crop", action="store_true",
                   help="crop aligned planes to the region valid in all of them (default: full frame, "
                        "borders replicated)")
    p.add_argument("--align-resampling", default="cubic", choices=["cubic", "lanczos4", "linear"],
                   help="resampling of aligned planes (lanczos4: sharpest, about 4x the time of cubic)")
    p.add_argument("--match-exposure", action="store_true",
                   help="match each plane's gain/offset to the reference plane's")
    p.add_argument("--flat-field", default=None, metavar="PATH",
                   help="blank frame (file or s3:// uri) to divide every plane by before aligning")


def fuser_spec_from_args(args) -> dict:
    """Everything needed to build the fuser again inside a Ray actor."""
    from ray_mff.methods import default_method

    spec = {"name": args.method or default_method(), "engine": args.engine, "precision": args.precision,
            "calibration": args.calibration == "on"}
    if args.tile_size is not None:
        spec["tile_size"] = args.tile_size
    if getattr(args, "weights", None):
        spec["weights"] = args.weights
    if getattr(args, "correction", "off") == "on":  # only when on: the recipes of earlier runs stay as they were
        spec["correction"] = True
    return spec


def check_correction(spec: dict) -> None:
    """Setup check: ``--correction on`` needs a stack-native model (one with a fused-result branch)."""
    if not spec.get("correction"):
        return
    from ray_mff.methods import CLASSICAL_METHODS
    from ray_mff.models import is_stack_native

    if spec["name"] in CLASSICAL_METHODS or not is_stack_native(spec["name"]):
        raise SetupError(f"--correction on: method {spec['name']!r} has no fused-result branch "
                         "(stack-native models only: stacknet, stacknet_s)")


def check_weights(spec: dict) -> None:
    """Setup check on the driver: ``--weights`` names a readable file of the chosen learned model."""
    from ray_mff.methods import CLASSICAL_METHODS, local_weights

    if "weights" not in spec:
        return
    if spec["name"] in CLASSICAL_METHODS:
        raise SetupError(f"--weights: method {spec['name']!r} is classical and has no weights")
    from ray_mff.models import get_model

    try:
        get_model(spec["name"], weights=local_weights(spec["weights"]))
    except Exception as err:  # noqa: BLE001 - any reason is a setup error naming the file
        raise SetupError(f"--weights {spec['weights']}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def align_options_from_args(args):
    from ray_mff.align import AlignOptions

    return AlignOptions(mode=getattr(args, "align", "none"), reference=getattr(args, "align_reference", "middle"),
                        crop=getattr(args, "align_crop", False), match_exposure=getattr(args, "match_exposure", False),
                        flat_field=getattr(args, "flat_field", None),
                        resampling=getattr(args, "align_resampling", "cubic"))


def run_options_from_args(args):
    from ray_mff.runner import RunOptions

    opts = RunOptions(output_format=args.output_format, save_decision_maps=args.save_decision_maps,
                      compute_metrics=not args.no_metrics, force=args.force, z_axis=args.z_axis,
                      depth_map=args.depth_map, align=align_options_from_args(args),
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
    if summary.engine_busy is not None:
        print(f"fusion engine busy {summary.engine_busy:.0%} of its time (sum of fuse_s / engine wall time)",
              file=out)
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
    from ray_mff.listing import discover_listing
    from ray_mff.runner import recipe_id, run_local

    if args.s3_endpoint:
        storage.set_s3_endpoint(args.s3_endpoint)
    if _same_place(args.input, args.output):
        raise SetupError(f"{args.output}: OUTPUT is INPUT; fused images would mix with the stacks "
                         f"(use a sub-folder such as {storage.join_uri(args.input, 'fused')})")
    storage.probe(args.input)
    # ids and fingerprints as Arrow columns, the stacks compressed, built folder by folder: a million
    # stacks are discovered and planned in well under 1 GB
    stacks = discover_listing(args.input, pattern=args.pattern, stack_per_file=args.stack_per_file,
                              leave_out=_in_output(args.input, args.output))
    if not len(stacks):
        return None
    storage.probe(args.output, write=True)  # after discovery: a new OUTPUT inside INPUT is no empty stack
    spec = fuser_spec_from_args(args)
    check_weights(spec)
    check_correction(spec)
    opts = run_options_from_args(args)
    opts.recipe_id = recipe_id(spec, opts)
    executor, why = args.executor, "asked for"
    if executor == "auto":
        executor, why = choose_executor(len(stacks), spec, args.ray_address)
    log.info("%d stacks in %s; method %s; executor %s (%s)", len(stacks), args.input, spec["name"], executor, why)
    run_id = manifest.new_run_id()
    with lease.acquire(args.output, run_id, wait=getattr(args, "wait", False)) as held:
        if executor == "ray":
            from ray_mff.pipeline import run_pipeline

            opts.lease_uri, opts.lease_token = held.uri, held.token
            return run_pipeline(stacks, spec, args.output, opts, run_id=run_id, num_actors=args.num_actors,
                                min_actors=args.min_actors, max_actors=args.max_actors,
                                batch_size=args.batch_size, ray_address=args.ray_address,
                                s3_endpoint=args.s3_endpoint, num_gpus_per_actor=args.gpus_per_actor,
                                flush_every=args.flush_every)
        return run_local(stacks, lambda: get_fuser(**spec), args.output, opts, run_id=run_id)


def choose_executor(n_stacks: int, spec: dict, ray_address: str | None,
                    cores: int | None = None) -> tuple[str, str]:
    """``(executor, why)`` for ``--executor auto``.

    Ray when there is a cluster to use: ``--ray-address``, ``RAY_ADDRESS`` (as under ``ray job
    submit``) or a Ray instance this process is already connected to. Otherwise (a laptop) the
    local loop, unless this machine has at least RAY_MIN_CORES cores and the run is long enough
    that spreading it over them saves more than RAY_MIN_SAVING_S seconds.
    """
    import os

    if ray_address:
        return "ray", f"--ray-address {ray_address}"
    if os.environ.get("RAY_ADDRESS"):
        return "ray", "RAY_ADDRESS is set"
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return "ray", "this process is connected to Ray"
    from ray_mff.methods import CLASSICAL_METHODS

    cores = cores or os.cpu_count() or 1
    kind = "classical" if spec.get("name") in CLASSICAL_METHODS else "learned"
    estimate = n_stacks * _SECONDS_PER_STACK[kind]
    saving = estimate * (1.0 - 1.0 / cores)
    if cores < RAY_MIN_CORES:
        return "local", f"no Ray cluster given, and {cores} cores gain too little from Ray's worker processes"
    if saving < RAY_MIN_SAVING_S:
        return "local", (f"no Ray cluster given; ~{estimate:.0f} CPU-seconds of work would save ~{saving:.0f} s on "
                         f"{cores} cores, less than Ray's start-up is worth")
    return "ray", f"no cluster given, but ~{estimate:.0f} CPU-seconds of work spread over {cores} local cores"


def _in_output(input_root: str, output_root: str):
    """Which stacks lie inside OUTPUT, for when OUTPUT is under INPUT (``s3://a`` -> ``s3://a/fused``):
    our own fused images and manifest parts are not new stacks to fuse every night. None when no
    stack can (OUTPUT is not under INPUT); else a test on a stack (it has uris, all inside OUTPUT),
    for :func:`ray_mff.listing.discover_listing`'s ``leave_out``. Decided once on the resolved paths,
    then per stack by the uris' prefix in INPUT's spelling (discovery spells every uri as
    ``join_uri(INPUT, relative path)``), not by resolving every uri."""
    from ray_mff import storage
    from ray_mff.listing import InsideOutput

    in_fs, in_path = storage.resolve(input_root)
    out_fs, out_path = storage.resolve(output_root)
    if in_fs.protocol != out_fs.protocol:
        return None
    in_path, out_path = in_path.rstrip("/"), out_path.rstrip("/")
    if (in_path + "/").startswith(out_path + "/"):  # INPUT inside OUTPUT: everything is
        return InsideOutput(None)
    if not out_path.startswith(in_path + "/"):
        return None
    return InsideOutput(storage.join_uri(input_root, *out_path[len(in_path) + 1:].split("/"), "x")[:-1])


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
    from ray_mff.align import align_stack
    from ray_mff.stacks import discover_stacks

    if args.s3_endpoint:
        storage.set_s3_endpoint(args.s3_endpoint)
    fused_files = _index_by_stem([e.uri for e in storage.list_files(args.fused)])
    truth_files = _index_by_stem([e.uri for e in storage.list_files(args.truth)]) if args.truth else {}
    align = align_options_from_args(args)
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
            sources, _ = align_stack(sources, align)  # the fused image's frame (a no-op by default)
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
    """Image files by name stem. A fused folder's own images win over same-named files below it,
    and ``decision_maps/`` (written by ``fuse --save-decision-maps`` under the same stems) is
    never taken for the fused images."""
    from ray_mff.sinks import DECISION_MAP_DIR

    out = {}
    for uri in sorted(uris, key=lambda u: u.count("/")):
        if f"/{DECISION_MAP_DIR}/" in uri or uri.startswith(f"{DECISION_MAP_DIR}/"):
            continue
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
    add_align_options(p)
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

    from ray_mff.train.trainer import add_train_arguments, cmd_train

    p = sub.add_parser("train", help="train a fusion model with Ray Train")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a model to ONNX (and TensorRT engines on GPU nodes)")
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)
    return parser


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from ray_mff.export import OPSET
    from ray_mff.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model to export (default: {DEFAULT_MODEL})")
    p.add_argument("--weights", default="default",
                   help="'default' (shipped weights), a safetensors path, or 'none' (random init)")
    p.add_argument("--format", dest="export_format", default="onnx", choices=["onnx", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--no-verify", action="store_true", help="skip the comparison against torch")
    p.add_argument("--min-shape", default="64x64", help="TensorRT profile: smallest HxW")
    p.add_argument("--opt-shape", default="1024x1024", help="TensorRT profile: HxW to optimise for")
    p.add_argument("--max-shape", default="2048x2048", help="TensorRT profile: largest HxW (bigger images are tiled)")
    p.add_argument("--max-batch", type=int, default=4, help="TensorRT profile: largest batch")
    p.add_argument("--workspace-mib", type=int, default=2048, help="TensorRT builder workspace limit")


def _parse_hw(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def cmd_export(args) -> int:
    """``ray-mff export``: ONNX graphs (verified against torch) or TensorRT plans (GPU nodes)."""
    from pathlib import Path

    from ray_mff.export import export_onnx
    from ray_mff.models import is_stack_native

    out = Path(args.out)
    if is_stack_native(args.model):
        return _export_stack(args, out)
    if args.export_format == "tensorrt":
        # fail before any work if TensorRT cannot run here: one clear line, exit 2 (main)
        from ray_mff.engines.choice import require_tensorrt
        from ray_mff.engines.tensorrt_build import ShapeProfile, build_plans

        require_tensorrt()
        profile = ShapeProfile(min_hw=_parse_hw(args.min_shape), opt_hw=_parse_hw(args.opt_shape),
                               max_hw=_parse_hw(args.max_shape), max_batch=args.max_batch)
        res = build_plans(args.model, out, precision=args.precision, weights=args.weights, profile=profile,
                          workspace_bytes=args.workspace_mib << 20, timing_cache=out / "timing.cache")
        _print_export(args.model, res["onnx"])
        print(f"tensorrt {res['facts']['tensorrt']} on {res['facts']['gpu']}: {res['encoder']}, {res['decider']} "
              f"({res['facts']['mode']['why']})")
        return 0
    res = export_onnx(args.model, out, args.precision, args.weights, opset=args.opset, verify=not args.no_verify)
    _print_export(args.model, res)
    return 0


def _export_stack(args, out) -> int:
    """A stack-native model: ``encoder.onnx``, ``joint.onnx``, ``decide.onnx`` and ``meta.json``
    (what its ONNX Runtime engine runs), checked against torch on a random 3-image stack."""
    import numpy as np

    from ray_mff.engines.stack_engine import StackOnnxEngine, StackTorchEngine, export_stack_model
    from ray_mff.models import get_model

    if args.export_format != "onnx" or args.precision != "fp32":
        raise SetupError(f"{args.model} is stack-native: exported as fp32 ONNX only for now "
                         f"(asked for {args.export_format} {args.precision})")
    net = get_model(args.model, weights=None if args.weights in (None, "none") else args.weights)
    encoder, joint = export_stack_model(net, out)
    print(f"{args.model} (fp32, stack-native) -> {encoder}, {joint}, {joint.with_name('decide.onnx')}")
    if not args.no_verify:
        y = np.random.default_rng(0).random((3, 1, 96, 128), dtype=np.float32)
        onnx, ref = StackOnnxEngine(encoder, joint, threads=1), StackTorchEngine(net, device="cpu")
        for fused in (True, False):
            a = onnx.decide_stack(onnx.encode(y), y, fused=fused)
            b = ref.decide_stack(ref.encode(y), y, fused=fused)
            print(f"verify {'joint ' if fused else 'decide'} 3x96x128: weights max|onnx-torch| "
                  f"{float(np.abs(a[1] - b[1]).max()):.3g}")
    return 0


def _print_export(model: str, res: dict) -> None:
    print(f"{model} ({res['precision']}, opset {res['opset']}, {res['feature_channels']} feature channels) -> "
          f"{res['encoder']}, {res['decider']}")
    for kind, v in (res.get("verification") or {}).items():
        print(f"verify {kind:6s} {v['shape'][0]}x{v['shape'][1]}: features max|onnx-torch| {v['features_max_abs']:.3g}"
              f"  decision max|onnx-torch| {v['decision_max_abs']:.3g}")


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
