"""Nightly archive fusion: fuse whatever is new under an input prefix, and nothing else.

Submit it to a Ray cluster (see docs/pipeline.md)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/nightly_fuse.py --input s3://archive/stacks --output s3://archive/fused

It is ``ray-mff fuse`` with Ray as the executor and ``--input/--output`` options, so the two share
every behaviour (the same argument parser, :func:`ray_mff.cli.run_fuse`, the same pipeline):

- *what is new*: the output's ``manifest.parquet`` records, per stack, the fingerprint of its inputs
  (uris and sizes). A stack is fused when it has no row, when its members changed since (a late
  focal plane, a replaced file), or when its recorded output is gone; everything else is skipped
  without reading a pixel. ``--force`` fuses everything again (a new row per stack; readers take the
  newest, see :func:`ray_mff.manifest.latest_rows`).
- *killed half-way*: manifest parts are flushed every ``--flush-every`` stacks (and every 30 s), so
  a rerun does only the stacks without a row; each ends with one output and one row.
- *bad stacks* become error rows naming the file and the reason; the job carries on, and does not
  retry them until their inputs change.

Exit code: 0 when every stack was fused or skipped, 1 when some failed, 2 on a usage/setup error,
3 when another run holds OUTPUT's lease, 4 when storage was lost mid-run, 130/143 on SIGINT/SIGTERM
(see docs/reliability.md).
The last line printed is ``nightly: fused=N skipped=N failed=N run=RUN_ID output=URI``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from ray_mff import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nightly_fuse", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder or s3:// prefix of stacks")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for fused images and manifest.parquet")
    p.add_argument("-v", "--verbose", action="store_true")
    cli.add_fuse_options(p)
    p.set_defaults(executor="ray")  # a nightly job is a Ray job; --executor local still works
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="nightly: %(message)s",
                        stream=sys.stderr)
    t0 = time.monotonic()
    from ray_mff.lease import LeaseHeld
    from ray_mff.runner import install_signal_handlers

    install_signal_handlers()  # SIGTERM (ray job stop, timeout): finish the stack in hand, flush, exit 143
    try:
        summary = cli.run_fuse(args)
    except LeaseHeld as err:
        print(f"nightly: {err}", file=sys.stderr)
        return 3
    except Exception as err:  # listing/planning failed (bad prefix, no credentials): nothing was fused
        if args.verbose:
            raise
        print(f"nightly: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"nightly: fused=0 skipped=0 failed=0 run=- output={args.output} (no stacks under {args.input})")
        return 0
    cli.print_run_summary(summary)
    print(f"nightly: fused={summary.fused} skipped={summary.skipped} failed={summary.failed} "
          f"run={summary.run_id} output={summary.output} seconds={time.monotonic() - t0:.1f}")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
