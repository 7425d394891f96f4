"""Write the model card ``ray_mff/models/weights/<name>.md`` of a trained model.

Reads the facts the training job stored in the safetensors metadata (steps, data, batch, losses;
:func:`ray_mff.train.trainer.export_best`), the training log for the loss curve and wall time,
and the Lytro scores from a ``bench/methods.py --json`` file, so the card states what was
measured, not what was hoped:

    .venv/bin/python jobs/model_card.py cnn --log runs/cnn.log --bench out/bench_methods.json \
        --command "python jobs/train.py --model cnn ..."
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_mff.models import default_weights_path, get_model, read_metadata  # noqa: E402

_REPORT = re.compile(r"\[train\] (.*)$")


def parse_log(path: Path) -> list[dict]:
    """The ``[train] k=v ...`` lines rank 0 prints at every report, as dicts (deduplicated by step)."""
    rows: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = _REPORT.search(line)
        if not m:
            continue
        row = {}
        for kv in m.group(1).split():
            k, _, v = kv.partition("=")
            try:
                row[k] = float(v)
            except ValueError:
                row[k] = v
        if "step" in row:
            rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def _fmt(row: dict, keys: list[str]) -> str:
    return ", ".join(f"{k} {row[k]:.4f}" for k in keys if isinstance(row.get(k), float))


def write_card(name: str, log: Path | None, bench: Path | None, command: str | None, notes: str | None) -> Path:
    weights = default_weights_path(name)
    meta = read_metadata(weights)
    model = get_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    doc = (sys.modules[type(model).__module__].__doc__ or "").strip().splitlines()
    final = json.loads(meta.get("final_metrics", "{}"))
    lines = [f"# Model card: `{name}`", "", doc[0] if doc else "", ""]
    lines += ["## Architecture", "",
              f"`{type(model).__module__}.{type(model).__name__}`, config `{meta.get('config')}`: "
              f"{n_params:,} parameters ({weights.stat().st_size / 1e6:.2f} MB safetensors). "
              f"`decide` returns: {getattr(model, 'output', 'decision')}"
              + (f"; post-processing: `{json.dumps(model.postprocess)}`" if getattr(model, "postprocess", None) else "")
              + ".", ""]
    lines += ["## Training", "",
              f"- objective: `{getattr(model, 'training_objective', 'gradient_aware')}` (`ray_mff/train/objectives.py`)",
              f"- data: `{meta.get('train_data')}` (validation: `{meta.get('val_data')}`), made on the fly",
              f"- steps: {meta.get('trained_steps')}, {meta.get('num_workers')} Ray Train workers x "
              f"{meta.get('batch_size_per_worker')} images per step, patch {meta.get('patch')}, "
              f"peak lr {meta.get('lr')}, seed {meta.get('seed')}"]
    if command:
        lines.append(f"- command: `{command}`")
    history = parse_log(log) if log and log.is_file() else []
    wall = final.get("wall_s") or (history[-1].get("wall_s") if history else None)
    if wall:
        lines.append(f"- wall time: {wall / 60:.1f} min of training on this machine's CPU (2 cores, shared)")
    loss_keys = [k for k in (history[-1] if history else final) if k not in ("step", "lr", "wall_s", "best_val",
                                                                            "resumed_from")]
    if history:
        lines.append(f"- first report (step {int(history[0]['step'])}): {_fmt(history[0], loss_keys)}")
        lines.append(f"- last report (step {int(history[-1]['step'])}): {_fmt(history[-1], loss_keys)}")
    elif final:
        lines.append(f"- final: {_fmt(final, loss_keys)}")
    if meta.get("best_val_loss"):
        lines.append(f"- best validation loss: {float(meta['best_val_loss']):.4f} (the exported weights)")
    lines.append("")
    if bench and bench.is_file():
        rows = {r["method"]: r for r in json.loads(bench.read_text())}
        if name in rows:
            lines += ["## Lytro (bench/methods.py)", "",
                      "| set | method | engine | Q_G | Q_Y | Q_MI | Q_CB | MP/s |", "|---|---|---|---|---|---|---|---|"]
            for key in ("pairs", "triples"):
                for m in (name, "dwt", "guided"):
                    r = rows.get(m, {})
                    if key in r:
                        v = r[key]
                        lines.append(f"| {v['n']} {key} | {m} | {r['engine']} | {v['q_g']:.4f} | {v['q_y']:.4f} | "
                                     f"{v['q_mi']:.4f} | {v['q_cb']:.4f} | {v['mp_s']:.2f} |")
            lines.append("")
    if notes:
        lines += ["## Notes", "", notes, ""]
    card = weights.with_suffix(".md")
    card.write_text("\n".join(lines))
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--log", type=Path, default=None, help="training log (stdout of jobs/train.py)")
    p.add_argument("--bench", type=Path, default=None, help="bench/methods.py --json file")
    p.add_argument("--command", default=None, help="the training command, for the record")
    p.add_argument("--notes", default=None)
    args = p.parse_args(argv)
    print(write_card(args.name, args.log, args.bench, args.command, args.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
