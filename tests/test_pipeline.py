"""The Ray Data pipeline and the nightly job against a real S3 HTTP API (moto on 127.0.0.1).

Runs on the shared local Ray instance (``ray_session``: 2 CPUs). What a user relies on:
s3:// in and out through the same CLI on both executors (and local<->s3 mixes), bad stacks as
error rows, plain Parquet manifest readable with pandas/pyarrow, reruns that skip everything, a
killed driver whose rerun ends with one output and one row per stack, and a cluster.yaml that Ray's
own schema accepts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_mff import cli, io, storage
from ray_mff.synthetic import render_focus_stack

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_process_endpoint():
    """--s3-endpoint sets a process-wide default: never let it leak from one test to the next."""
    yield
    storage.set_s3_endpoint(None)


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.random((h // 8, w // 8, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
    img = img + 0.15 * rng.random((h, w, 3))
    return np.clip(img / img.max(), 0, 1)


def _good_stacks(root: Path, n: int, size: int = 64, prefix: str = "scene") -> list[str]:
    """``n`` folder-per-stack 8-bit pairs under ``root``; their stack ids."""
    ids = []
    for i in range(n):
        stack, _, _ = render_focus_stack(_texture(size, size, i), 2, seed=i, dtype=np.uint8)
        sid = f"{prefix}{i:03d}"
        for j, img in enumerate(stack):
            io.write_image(str(root / sid / f"{sid}_{'AB'[j]}.png"), img)
        ids.append(sid)
    return ids


def _bad_archive(root: Path) -> dict[str, str]:
    """Good stacks (8-bit pairs, a 16-bit triple) and every kind of bad one; id -> expected status."""
    expected = {sid: "ok" for sid in _good_stacks(root, 3)}
    deep, _, _ = render_focus_stack(_texture(64, 80, 7)[..., 0], 3, seed=7, dtype=np.uint16)
    for i, img in enumerate(deep):
        io.write_image(str(root / "deep16" / f"deep_z{i:03d}.tif"), img)
    expected["deep16"] = "ok"
    pair, _, _ = render_focus_stack(_texture(64, 64, 9), 2, seed=9, dtype=np.uint8)
    good_png = io.encode_image(pair[0], "png")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "corrupt_A.png").write_bytes(good_png[: len(good_png) // 2])  # truncated
    io.write_image(str(root / "corrupt" / "corrupt_B.png"), pair[1])
    io.write_image(str(root / "mismatch" / "mismatch_A.png"), pair[0])
    io.write_image(str(root / "mismatch" / "mismatch_B.png"), pair[1][:48, :48])
    io.write_image(str(root / "text" / "text_A.png"), pair[0])
    (root / "text" / "text_B.png").write_text("this is not an image")
    expected.update(corrupt="error", mismatch="error", text="error", empty="error")
    return expected


def _upload(endpoint: str, local: Path, uri: str, empty_dirs: tuple[str, ...] = ()) -> None:
    fs = _fs(endpoint)
    fs.put(str(local) + "/", uri.removeprefix("s3://") + "/", recursive=True)
    for d in empty_dirs:  # an S3 "folder" with nothing in it: the console's folder marker
        fs.pipe_file(f"{uri.removeprefix('s3://')}/{d}/", b"")


def _read_manifest(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """The manifest with plain pyarrow (no ray_mff), as any downstream reader would."""
    if uri.startswith("s3://"):
        fs = _fs(endpoint)
        path = uri.removeprefix("s3://") + "/manifest.parquet"
        return pq.read_table(path, filesystem=fs).to_pandas()
    return pd.read_parquet(Path(uri) / "manifest.parquet")


def _images_under(uri: str, endpoint: str | None = None) -> list[str]:
    if uri.startswith("s3://"):
        fs = _fs(endpoint)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(uri.removeprefix("s3://"), refresh=True)]
    else:
        names = os.listdir(uri)
    return sorted(n for n in names if n.endswith((".png", ".tif")))


# -------------------------------------------------------------------------------------------- tests


def test_s3_archive_with_bad_stacks_on_ray(ray_s3, s3_bucket, tmp_path, capsys):
    endpoint = ray_s3
    expected = _bad_archive(tmp_path / "in")
    src, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/fused"
    _upload(endpoint, tmp_path / "in", src, empty_dirs=("empty",))

    # The endpoint reaches driver and workers only through --s3-endpoint (no AWS_ENDPOINT_URL*).
    assert storage.s3_endpoint_from_env() is None
    args = ["fuse", src, out, "--method", "guided", "--executor", "ray", "--s3-endpoint", endpoint]
    assert cli.main(args) == 1  # some stacks failed, and the exit code says so
    printed = capsys.readouterr()
    assert "4 failed" in printed.out and "4 fused" in printed.out

    df = _read_manifest(out, endpoint)
    assert df["stack_id"].is_unique and set(df["stack_id"]) == set(expected)
    by_id = df.set_index("stack_id")
    assert by_id["status"].to_dict() == expected
    assert "corrupt_A.png" in by_id.loc["corrupt", "error"]
    assert "mismatch_B.png" in by_id.loc["mismatch", "error"]
    assert "text_B.png" in by_id.loc["text", "error"]
    assert by_id.loc["deep16", "dtype"] == "uint16" and by_id.loc["deep16", "n_images"] == 3
    assert list(by_id.loc["scene000", "source_uris"]) == [f"{src}/scene000/scene000_A.png",
                                                         f"{src}/scene000/scene000_B.png"]
    assert (by_id.loc[by_id.status == "ok", "q_g"] > 0.3).all()
    assert df["run_id"].nunique() == 1 and str(df["finished_at"].dtype).startswith("datetime64")
    # Plain Arrow types only: strings, numbers, list<string>, timestamp; no Ray extension types.
    fs = _fs(endpoint)
    schema = pq.read_schema(fs.find(f"{s3_bucket}/fused/manifest.parquet")[0], filesystem=fs)
    assert not any("extension" in str(f.type) or "ray" in str(f.type) for f in schema)
    # Outputs: one per good stack, decodable, dtype kept; nothing for bad stacks, no temp files.
    assert _images_under(out, endpoint) == ["deep16.tif", "scene000.png", "scene001.png", "scene002.png"]
    deep = io.decode_image(fs.cat_file(f"{s3_bucket}/fused/deep16.tif"))
    assert deep.dtype == np.uint16 and deep.shape == (64, 80)
    # Credentials never reach the manifest or the console.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in df.astype(str).to_csv() and secret not in printed.out + printed.err

    # A second run does nothing: every stack is skipped (known failures too, inputs unchanged).
    assert cli.main(args) == 0
    assert "0 fused, 8 skipped, 0 failed" in capsys.readouterr().out
    assert len(_read_manifest(out, endpoint)) == len(expected)


def test_cli_s3_on_local_executor_with_env_endpoint(ray_s3, s3_bucket, tmp_path, monkeypatch, capsys):
    """Same CLI, same storage, no Ray: the endpoint from AWS_ENDPOINT_URL_S3 this time."""
    _good_stacks(tmp_path / "in", 2)
    _upload(ray_s3, tmp_path / "in", f"s3://{s3_bucket}/in")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", ray_s3)
    out = f"s3://{s3_bucket}/out"
    assert cli.main(["fuse", f"s3://{s3_bucket}/in", out, "--method", "dwt", "--executor", "local"]) == 0
    df = _read_manifest(out, ray_s3)
    assert sorted(df.stack_id) == ["scene000", "scene001"] and (df.status == "ok").all()
    assert _images_under(out, ray_s3) == ["scene000.png", "scene001.png"]


def test_mixed_local_and_s3(ray_s3, s3_bucket, tmp_path, monkeypatch):
    """local -> s3 and s3 -> local through the pipeline; the workers get the driver's env endpoint."""
    from ray_mff.pipeline import run_pipeline
    from ray_mff.runner import RunOptions
    from ray_mff.stacks import discover_stacks

    monkeypatch.setenv("AWS_ENDPOINT_URL", ray_s3)  # driver only: Ray workers started without it
    ids = _good_stacks(tmp_path / "in", 3)
    up = f"s3://{s3_bucket}/fused"
    summary = run_pipeline(discover_stacks(str(tmp_path / "in")), {"name": "dwt"}, up, RunOptions(),
                           num_actors=1)
    assert (summary.fused, summary.failed) == (3, 0)
    assert _images_under(up, ray_s3) == [f"{i}.png" for i in ids]

    # ... and s3 -> local, from the same stacks uploaded.
    _upload(ray_s3, tmp_path / "in", f"s3://{s3_bucket}/in")
    down = tmp_path / "down"
    summary = run_pipeline(discover_stacks(f"s3://{s3_bucket}/in"), {"name": "dwt"}, str(down), RunOptions(),
                           num_actors=1)
    assert (summary.fused, summary.failed) == (3, 0)
    df = _read_manifest(str(down))
    assert sorted(df.stack_id) == ids and (df.status == "ok").all()
    assert df.source_uris.map(lambda u: u[0].startswith("s3://")).all()
    assert _images_under(str(down)) == [f"{i}.png" for i in ids]


def _nightly_cmd(src: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "nightly_fuse.py"), "--input", src, "--output", out,
            "--method", "guided", *extra]


def test_nightly_killed_midway_then_rerun(ray_s3, s3_bucket, tmp_path):
    """SIGKILL the nightly driver after its first manifest part; the rerun finishes the rest, and
    every stack ends with exactly one output and one manifest row. Then: nothing new -> nothing done."""
    import ray

    endpoint = ray_s3
    ids = _good_stacks(tmp_path / "in", 40, size=96)
    src, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    _upload(endpoint, tmp_path / "in", src)
    fs = _fs(endpoint)
    parts_dir = f"{s3_bucket}/out/manifest.parquet"

    # The job connects to this test's Ray (as `ray job submit` drivers connect to the cluster's).
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_nightly_cmd(src, out, "--s3-endpoint", endpoint, "--num-actors", "1",
                                         "--flush-every", "1"),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if fs.exists(parts_dir) and fs.ls(parts_dir, refresh=True):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, as an OOM killer or a lost node would
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first = _read_manifest(out, endpoint)
    assert 0 < len(first) < len(ids), "the driver should have died mid-run"
    assert first["stack_id"].is_unique

    nightly = _load_nightly()
    # --wait: the killed driver's S3 lease lapses within its ttl (ray_mff.lease)
    assert nightly.main(["--input", src, "--output", out, "--method", "guided", "--s3-endpoint", endpoint,
                         "--wait"]) == 0
    df = _read_manifest(out, endpoint)
    assert sorted(df.stack_id) == ids  # one row per stack: none lost, none duplicated
    assert (df.status == "ok").all() and df["run_id"].nunique() == 2
    assert _images_under(out, endpoint) == [f"{i}.png" for i in ids]  # one output per stack
    assert not any(".tmp" in p for p in fs.find(f"{s3_bucket}/out"))

    # Idempotent: nothing new, nothing done. A new stack arriving is all the next run does.
    storage.set_s3_endpoint(None)
    assert nightly.main(["--input", src, "--output", out, "--method", "guided", "--s3-endpoint", endpoint,
                         "--executor", "local"]) == 0
    assert len(_read_manifest(out, endpoint)) == len(ids)
    # What arrives next: a new stack, a broken one, and a late third focal plane for scene000.
    late = tmp_path / "late"
    _good_stacks(late, 1, prefix="late")
    (late / "broken").mkdir()
    (late / "broken" / "broken_A.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    io.write_image(str(late / "broken" / "broken_B.png"), io.read_image(str(late / "late000" / "late000_A.png")))
    third = render_focus_stack(_texture(96, 96, 0), 3, seed=0, dtype=np.uint8)[0][2]
    io.write_image(str(late / "scene000" / "scene000_C.png"), third)
    _upload(endpoint, late, src)
    code, summary_line = _run_nightly_capture(nightly, src, out, endpoint)
    assert code == 1 and "fused=2 skipped=39 failed=1" in summary_line  # the carries-on case
    df = _read_manifest(out, endpoint)
    assert len(df) == len(ids) + 3  # the manifest is a log: scene000's old row stays, the newest wins
    newest = df.sort_values("finished_at").drop_duplicates("stack_id", keep="last").set_index("stack_id")
    assert newest.loc["scene000", "n_images"] == 3 and newest.loc["late000", "status"] == "ok"
    assert "broken_A.png" in newest.loc["broken", "error"]
    # ... and the night after, nothing is new.
    code, summary_line = _run_nightly_capture(nightly, src, out, endpoint)
    assert code == 0 and "fused=0 skipped=42 failed=0" in summary_line


def _load_nightly():
    spec = importlib.util.spec_from_file_location("nightly_fuse", REPO / "jobs" / "nightly_fuse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_nightly_capture(nightly, src: str, out: str, endpoint: str) -> tuple[int, str]:
    """(exit code, last printed line) of an in-process nightly run on the local executor."""
    import contextlib
    import io as _io

    buf = _io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = nightly.main(["--input", src, "--output", out, "--method", "guided", "--s3-endpoint", endpoint,
                             "--executor", "local"])
    return code, buf.getvalue().strip().splitlines()[-1]


def test_cluster_yaml_matches_ray_schema():
    """cluster.yaml as `ray up` sees it: merged with Ray's AWS defaults, then schema-validated."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]
                 and t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types)  # autoscaling
    assert head.get("resources", {}).get("GPU", 0) == 0
    workers = "\n".join(config["setup_commands"] + config["worker_setup_commands"])
    assert workers.index("install -q torch") < workers.index("[gpu]")  # torch first, then ray-mff
    assert "docker" not in config or not config["docker"]


def test_resources_follow_the_method_and_the_cluster():
    """GPUs for learned models when the cluster has them (or when asked), never for classical ones."""
    from ray_mff.pipeline import plan_resources

    gpu_cluster, cpu_cluster = {"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0}
    kw = dict(num_actors=None, num_cpus_per_actor=1.0, num_gpus_per_actor=None)
    strategy, gpus, actors = plan_resources({"name": "cascade", "engine": "auto"}, gpu_cluster, **kw)
    # an autoscaling pool: starts with one actor, grows to one per GPU
    assert (gpus, actors) == (1.0, 4) and (strategy.min_size, strategy.max_size) == (1, 4)
    fixed = plan_resources({"name": "cascade"}, gpu_cluster, **{**kw, "num_actors": 3})[0]
    assert fixed.min_size == fixed.max_size == 3
    grow = plan_resources({"name": "cascade"}, cpu_cluster, num_gpus_per_actor=1.0, min_actors=2, max_actors=8)
    assert (grow[0].min_size, grow[0].max_size, grow[1]) == (2, 8, 1.0)
    assert plan_resources({"name": "guided"}, gpu_cluster, **kw)[1:] == (0.0, 16)
    assert plan_resources({"name": "cascade", "engine": "auto"}, cpu_cluster, **kw)[1:] == (0.0, 8)
    # An autoscaling cluster with no GPU worker up yet: ask for GPUs and the autoscaler adds nodes.
    kw.update(num_gpus_per_actor=1.0, num_actors=3)
    assert plan_resources({"name": "cascade"}, cpu_cluster, **kw)[1:] == (1.0, 3)


def test_output_inside_input_is_not_fused_again(tmp_path, capsys):
    """`ray-mff fuse archive archive/fused`: the results are not new stacks on the next run."""
    ids = _good_stacks(tmp_path / "archive", 2)
    args = ["fuse", str(tmp_path / "archive"), str(tmp_path / "archive" / "fused"), "--method", "dwt",
            "--executor", "local", "--save-decision-maps"]
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    assert "0 fused, 2 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(_read_manifest(str(tmp_path / "archive" / "fused")).stack_id) == ids


def test_staged_pipeline_pool_starts_below_its_maximum(ray_session, tmp_path):
    """read tasks -> an autoscaling fusion pool (min 1, max 8 on a 2-CPU Ray: a fixed pool of 8 could
    never start) -> write/score tasks; rows carry each stage's seconds and the summary the engine's
    busy fraction; a stack over the pixel budget takes the whole-stack path; bad stacks are error rows."""
    from ray_mff.pipeline import StageResources, run_pipeline
    from ray_mff.runner import RunOptions
    from ray_mff.stacks import discover_stacks

    class SlowCopyFuser:  # defined here so that Ray pickles it by value for its workers
        """A stand-in fuser: the first source, after a pause (no engine needed)."""

        name = "copy"

        def fuse(self, images):
            from ray_mff.fusion.result import FusionResult

            time.sleep(0.05)
            return FusionResult(np.asarray(images[0]), None, self.name, {"engine": "none-test"})

    ids = _good_stacks(tmp_path / "in", 5, size=48)
    big, _, _ = render_focus_stack(_texture(96, 96, 11), 3, seed=11, dtype=np.uint8)
    for j, img in enumerate(big):
        io.write_image(str(tmp_path / "in" / "big" / f"big_{j}.png"), img)
    (tmp_path / "in" / "bad").mkdir()
    (tmp_path / "in" / "bad" / "bad_A.png").write_bytes(b"not a png")
    io.write_image(str(tmp_path / "in" / "bad" / "bad_B.png"), big[0][:48, :48])
    seen = []
    summary = run_pipeline(discover_stacks(str(tmp_path / "in")), {"name": "copy"}, str(tmp_path / "out"),
                           RunOptions(save_decision_maps=True), min_actors=1, max_actors=8, batch_size=2,
                           resources=StageResources(pixel_budget=3 * 64 * 64), fuser_factory=SlowCopyFuser,
                           on_row=seen.append)
    assert (summary.fused, summary.failed) == (6, 1) and len(seen) == 7
    # the pool ran on what 2 CPUs hold (a fixed pool of 8 one-CPU actors could never start)
    assert 1 <= len({r["_actor"] for r in seen if r.get("_actor")}) < 8
    df = _read_manifest(str(tmp_path / "out")).set_index("stack_id")
    assert df.loc["bad", "status"] == "error" and "bad_A.png" in df.loc["bad", "error"]
    ok = df[df.status == "ok"]
    assert sorted(ok.index) == sorted(ids + ["big"]) and (ok.method == "copy").all()
    for col in ("read_s", "fuse_s", "write_s", "score_s"):
        assert (ok[col] >= 0).all(), col
    assert (ok.q_g > 0).all() and ok.loc["big", "n_images"] == 3
    assert 0 < summary.engine_busy <= 1
    assert _images_under(str(tmp_path / "out")) == sorted(f"{i}.png" for i in ids + ["big"])


def test_engine_that_cannot_start_ends_the_run_in_one_line(ray_session, tmp_path, capsys):
    from ray_mff.errors import EngineUnavailableError
    from ray_mff.pipeline import run_pipeline
    from ray_mff.runner import RunOptions
    from ray_mff.stacks import discover_stacks

    class NoEngineFuser:
        def __init__(self):
            raise RuntimeError("no CUDA device: the stand-in engine needs one")

    _good_stacks(tmp_path / "in", 2, size=32)
    with pytest.raises(EngineUnavailableError) as err:
        run_pipeline(discover_stacks(str(tmp_path / "in")), {"name": "copy"}, str(tmp_path / "out"), RunOptions(),
                     num_actors=1, fuser_factory=NoEngineFuser)
    assert "no CUDA device" in str(err.value) and "\n" not in str(err.value)


def test_engine_checked_on_the_driver_before_any_actor(tmp_path, capsys, monkeypatch):
    """`--engine tensorrt` without TensorRT on a run whose workers are this machine: one line, exit 2."""
    pytest.importorskip("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    _good_stacks(tmp_path / "in", 2, size=32)
    code = cli.main(["fuse", str(tmp_path / "in"), str(tmp_path / "out"), "--method", "cascade",
                     "--engine", "tensorrt", "--executor", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and "tensorrt" in err[-1].lower()
    assert not any("Traceback" in line for line in err)


def test_executor_auto_says_why(monkeypatch):
    from ray_mff.cli import choose_executor

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh process with no Ray yet
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    assert choose_executor(20, {"name": "guided"}, "ray://head:10001")[0] == "ray"
    executor, why = choose_executor(20, {"name": "guided"}, None, cores=2)
    assert executor == "local" and "cores" in why
    assert choose_executor(20, {"name": "guided"}, None, cores=16)[0] == "local"  # 20 x 0.3 s: not worth it
    assert choose_executor(2000, {"name": "guided"}, None, cores=16)[0] == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert choose_executor(3, {"name": "guided"}, None, cores=2) == ("ray", "RAY_ADDRESS is set")


def test_fuse_stage_gives_same_shape_stacks_to_fuse_batch_in_one_call(tmp_path):
    """The fusion stage (called here in-process on a read stage's table) hands the 3 same-shape pairs
    of a batch to ``fuse_batch`` in one call, the triple and the odd-sized pair on their own; rows and
    fused images equal those of a fuser with ``fuse`` only (one stack per call)."""
    import pyarrow as pa

    from ray_mff.engines.torch_engine import TorchEngine
    from ray_mff.fusion.model_fuser import ModelFuser
    from ray_mff.models import get_model
    from ray_mff.pipeline import FuseStage, _unpack, read_stage, stack_to_item
    from ray_mff.runner import RunOptions
    from ray_mff.stacks import discover_stacks

    _good_stacks(tmp_path / "in", 3, size=48)
    _good_stacks(tmp_path / "in", 1, size=32, prefix="small")
    triple, _, _ = render_focus_stack(_texture(48, 48, 9), 3, seed=9, dtype=np.uint8)
    for j, img in enumerate(triple):
        io.write_image(str(tmp_path / "in" / "triple" / f"triple_{j}.png"), img)
    opts = RunOptions(save_decision_maps=True)
    table = pa.Table.from_pylist([stack_to_item(s) for s in discover_stacks(str(tmp_path / "in"))])
    read = read_stage(table, opts=opts)
    model = get_model("cascade")
    calls = []

    class Batched(ModelFuser):
        def fuse_batch(self, stacks):
            results = super().fuse_batch(stacks)
            calls.append(len(results))  # only when it succeeded (the stage would fall back to fuse)
            return results

    class OneByOne:  # fuse only: the stage calls it once per stack
        def __init__(self):
            self.inner = ModelFuser(TorchEngine(model))
            self.name = self.inner.name

        def fuse(self, images):
            return self.inner.fuse(images)

    # batch_stacks=True on CPU torch: the GPU engines' path (pairs share encode and decide calls)
    batched = FuseStage({}, opts, fuser_factory=lambda: Batched(TorchEngine(model), batch_stacks=True))(read)
    single = FuseStage({}, opts, fuser_factory=OneByOne)(read)
    assert calls == [3]  # the three 48 x 48 pairs; the triple and the 32 x 32 pair are groups of one
    volatile = ("fuse_s", "_actor", "_fuse_start", "_fuse_end")
    rows = [[{k: v for k, v in json.loads(r).items() if k not in volatile} for r in t.column("row").to_pylist()]
            for t in (batched, single)]
    assert rows[0] == rows[1] and len(rows[0]) == 5 and all(r.get("status") is None for r in rows[0])
    for col in ("fused", "decision"):
        for i in range(5):
            a = _unpack(batched.column(col)[i], batched.column(f"{col}_layout")[i].as_py())
            b = _unpack(single.column(col)[i], single.column(f"{col}_layout")[i].as_py())
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, (col, i)
