"""Archive runs a nightly job can trust (issue 15): each numbered problem, tried with real files, a
real moto S3 server, real signals and real Ray, and what must hold afterwards.

The invariant after every fault and its rerun: each stack has exactly one output, its newest
manifest row is ``ok``, and nothing that is not done is skipped.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_mff import cli, io, lease, manifest, runner, storage
from ray_mff.listing import listing_of
from ray_mff.synthetic import render_focus_stack

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)
GUIDED = ["--method", "guided", "--no-metrics"]


@pytest.fixture(autouse=True)
def _clean_process_state():
    yield
    storage.set_s3_endpoint(None)
    runner.STOP.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.random((h // 8, w // 8, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img / img.max() + 0.1 * rng.random((h, w, 3)), 0, 1)


def _stacks(root: Path, n: int, size: int = 64, ext: str = "png", prefix: str = "s") -> list[str]:
    ids = []
    for i in range(n):
        planes, _, _ = render_focus_stack(_texture(size, size, i), 2, seed=i, dtype=np.uint8)
        sid = f"{prefix}{i:02d}"
        for j, img in enumerate(planes):
            io.write_image(str(root / sid / f"{sid}_{'AB'[j]}.{ext}"), img)
        ids.append(sid)
    return ids


def _fuse(src, out, *extra) -> int:
    return cli.main(["fuse", str(src), str(out), *GUIDED, "--executor", "local", *extra])


def _latest(out) -> pd.DataFrame:
    return manifest.latest_table(str(out)).to_pandas().set_index("stack_id")


def _assert_all_done_once(out: Path, ids: list[str]) -> None:
    """Exactly one output per stack, newest row ok for every stack, no temp files."""
    latest = _latest(out)
    assert sorted(latest.index) == sorted(ids)
    assert (latest.status == "ok").all(), latest[latest.status != "ok"][["error", "error_kind"]]
    images = sorted(p.name for p in Path(out).iterdir() if p.suffix in (".png", ".tif"))
    assert images == sorted(f"{i}.png" for i in ids)
    assert not [p for p in Path(out).rglob(".*") if p.is_file() and "tmp" in p.name]


# ------------------------------------------------------------- 1 + 2: failed writes, disk full, error kinds


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (as the issue's reproduction); skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_then_rerun(tiny_disk, tmp_path, capsys):
    ids = _stacks(tmp_path / "in", 6, size=128)
    out = tiny_disk / "out"
    out.mkdir()
    ballast = tiny_disk / "ballast"
    ballast.write_bytes(b"\0" * (2 * 1024 * 1024 - 8 * 4096 - 140 * 1024))  # room for a few images only
    code = _fuse(tmp_path / "in", out)
    printed = capsys.readouterr().out
    latest = _latest(out) if (out / "manifest.parquet").exists() else pd.DataFrame()
    assert code in (runner.EXIT_FAILED, runner.EXIT_STOPPED), printed
    assert "0 failed" not in printed.splitlines()[-1]
    if len(latest):
        bad = latest[latest.status != "ok"]
        assert (bad.error_kind == "storage").all()  # disk full is a storage error, not the stack's fault
    ballast.unlink()  # the operator frees space
    assert _fuse(tmp_path / "in", out) == 0
    _assert_all_done_once(out, ids)
    assert _fuse(tmp_path / "in", out) == 0  # and then nothing is left to do
    assert "0 fused, 6 skipped, 0 failed" in capsys.readouterr().out


def test_input_errors_wait_and_transient_errors_retry(tmp_path):
    """An input error waits for its input to change; a storage error is retried by the next run."""
    ids = _stacks(tmp_path / "in", 3)
    (tmp_path / "in" / "s01" / "s01_B.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert _fuse(tmp_path / "in", out) == 1
    assert _latest(out).loc["s01", "error_kind"] == "input"
    # A storage error recorded by an earlier run (what an outage leaves): forge it as a new row.
    row = {**manifest.latest_rows(str(out))["s02"], "status": "error", "error": "s02: no space left",
           "error_kind": "storage", "seq": manifest.next_seq(str(out))}
    manifest.write_part(str(out), [row], "forged", 0)
    opts = runner.RunOptions(recipe_id=_latest(out).loc["s00", "recipe_id"])
    from ray_mff.stacks import discover_stacks

    plan = runner.plan_stacks(discover_stacks(str(tmp_path / "in")), str(out), opts)
    assert plan.reasons == {"s02": "retry storage error"} and plan.waiting == 1
    # classification of real exceptions
    assert runner.classify_error(OSError(28, "No space left on device")) == "storage"
    assert runner.classify_error(io.ImageReadError("x.png", "truncated")) == "input"
    assert runner.classify_error(MemoryError()) == "resource"
    assert runner.classify_error(RuntimeError("bug")) == "internal"
    assert _fuse(tmp_path / "in", out) == 0 and _latest(out).loc["s02", "status"] == "ok"  # s01 waits
    assert _fuse(tmp_path / "in", out, "--retry-errors") == 1  # --retry-errors redoes input errors too
    assert len(manifest.read_manifest(str(out))) == 3 + 1 + 1 + 1


def test_same_size_replacement_is_noticed(tmp_path, s3_server, s3_bucket):
    """An uncompressed TIFF plane replaced by other pixels of the same size: fused again (local:
    mtime; S3: ETag)."""
    import tifffile

    for i in range(2):  # uncompressed TIFF planes: other pixels, same size
        planes, _, _ = render_focus_stack(_texture(64, 64, i), 2, seed=i, dtype=np.uint8)
        for j, img in enumerate(planes):
            (tmp_path / "in" / f"s{i:02d}").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tmp_path / "in" / f"s{i:02d}" / f"s{i:02d}_{'AB'[j]}.tif", img)
    out = tmp_path / "out"
    assert _fuse(tmp_path / "in", out) == 0
    plane = tmp_path / "in" / "s00" / "s00_A.tif"
    size = plane.stat().st_size
    img = io.read_image(str(plane))
    tifffile.imwrite(plane, 255 - img)
    assert plane.stat().st_size == size
    before = io.read_image(str(out / "s00.tif")) if (out / "s00.tif").exists() else io.read_image(str(out / "s00.png"))
    assert _fuse(tmp_path / "in", out) == 0
    latest = _latest(out)
    assert latest.loc["s00", "run_id"] != latest.loc["s01", "run_id"]  # only s00 was fused again
    after = io.read_image(latest.loc["s00", "output_uri"])
    assert not np.array_equal(before, after)

    fs = _s3fs(s3_server)
    fs.put(str(tmp_path / "in") + "/", f"{s3_bucket}/in/", recursive=True)
    src, dst = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    assert _fuse(src, dst, "--s3-endpoint", s3_server) == 0
    replaced = tmp_path / "s01_B.tif"
    tifffile.imwrite(replaced, 255 - io.read_image(str(tmp_path / "in" / "s01" / "s01_B.tif")))
    assert replaced.stat().st_size == (tmp_path / "in" / "s01" / "s01_B.tif").stat().st_size
    fs.pipe_file(f"{s3_bucket}/in/s01/s01_B.tif", replaced.read_bytes())
    storage.set_s3_endpoint(None)
    assert _fuse(src, dst, "--s3-endpoint", s3_server) == 0
    rows = manifest.read_manifest(dst).to_pandas()
    assert rows.stack_id.value_counts().to_dict() == {"s01": 2, "s00": 1}


# ------------------------------------------------------------------------------------- 3: the recipe


def test_changed_recipe_fuses_again_and_says_so(tmp_path, capsys):
    ids = _stacks(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert _fuse(tmp_path / "in", out) == 0
    capsys.readouterr()
    assert cli.main(["fuse", str(tmp_path / "in"), str(out), "--method", "dwt", "--no-metrics",
                     "--executor", "local"]) == 0
    printed = capsys.readouterr().out
    assert "3 fused, 0 skipped" in printed and "3 recipe changed" in printed
    assert set(_latest(out).method) == {"dwt"}
    assert cli.main(["fuse", str(tmp_path / "in"), str(out), "--method", "dwt", "--no-metrics",
                     "--executor", "local"]) == 0
    assert "0 fused, 3 skipped" in capsys.readouterr().out
    # the output format is part of the recipe too
    assert _fuse(tmp_path / "in", out, "--format", "tif") == 0
    assert "3 recipe changed" in capsys.readouterr().out
    # and so are a learned model's weights (hash of the file), engine and precision
    a = runner.recipe_id({"name": "cascade", "engine": "onnx"}, runner.RunOptions())
    assert a != runner.recipe_id({"name": "cascade", "engine": "onnx", "precision": "fp16"}, runner.RunOptions())
    assert a != runner.recipe_id({"name": "cascade", "engine": "onnx", "tile_size": 512}, runner.RunOptions())
    assert runner.weights_hash("cascade") is None or len(runner.weights_hash("cascade")) == 16


# ------------------------------------------------------------------------------------- 4: one writer


def test_second_run_exits_3_or_waits(tmp_path, capsys):
    _stacks(tmp_path / "in", 2)
    out = tmp_path / "out"
    held = lease.acquire(str(out), "other-run")
    try:
        assert _fuse(tmp_path / "in", out) == 3
        assert "another ray-mff run is writing here: run other-run" in capsys.readouterr().err
        assert not (out / "manifest.parquet").exists()  # nothing fused, nothing recorded
        threading.Timer(1.0, held.release).start()
        t0 = time.monotonic()
        assert _fuse(tmp_path / "in", out, "--wait") == 0  # queued behind it, then ran
        assert time.monotonic() - t0 >= 0.9
    finally:
        held.release()
    assert not (out / lease.LOCK_NAME).exists()


def test_s3_lease_is_create_only_and_lapses(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    root = f"s3://{s3_bucket}/out"
    first = lease.acquire(root, "run-1", ttl=1.5)
    with pytest.raises(lease.LeaseHeld, match="run run-1"):
        lease.acquire(root, "run-2", ttl=1.5)
    time.sleep(1.0)  # the heartbeat (every ttl/3) keeps it alive past its first expiry
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(root, "run-2", ttl=1.5)
    assert lease.still_held(first.uri, "run-1")
    first._stop.set()  # a killed run: no more heartbeats, no release
    first._thread.join()
    time.sleep(1.7)
    second = lease.acquire(root, "run-2", ttl=1.5)  # lapsed: taken over
    assert not lease.still_held(first.uri, "run-1")  # the killed run's workers now write nothing
    second.release()
    assert not storage.exists(first.uri)


# -------------------------------------------------------------------------------- 5: interruptions


def test_sigterm_finishes_the_stack_in_hand_then_rerun(tmp_path):
    ids = _stacks(tmp_path / "in", 12, size=256)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ray_mff.cli", "fuse", str(tmp_path / "in"), str(out), *GUIDED,
           "--executor", "local", "--flush-every", "1000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("s*.png")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    printed = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 143, printed
    assert "stopped early (SIGTERM)" in printed
    first = manifest.read_manifest(str(out)).to_pandas()
    done = sorted(p.stem for p in out.glob("s*.png"))
    assert 0 < len(first) < len(ids)
    assert sorted(first.stack_id) == done  # every finished output has its row: none lost, none extra
    assert _fuse(tmp_path / "in", out) == 0
    _assert_all_done_once(out, ids)
    assert len(manifest.read_manifest(str(out))) == len(ids)


# ----------------------------------------------------------------------------- 6: nothing-to-do reruns


def test_nothing_to_do_reruns_exit_0(tmp_path):
    """One in the suite (a fresh interpreter each); docs/reliability.md reports 20 in a row."""
    _stacks(tmp_path / "in", 2)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ray_mff.cli", "fuse", str(tmp_path / "in"), str(out), *GUIDED, "--executor", "local"]
    assert _fuse(tmp_path / "in", out) == 0
    for _ in range(1):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "0 fused, 2 skipped, 0 failed" in done.stdout


# ------------------------------------------------------------------------------ 7: storage outages


def _s3fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def test_unreachable_storage_is_a_fast_setup_error(tmp_path, monkeypatch):
    _stacks(tmp_path / "in", 1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ray_mff.cli", "fuse", str(tmp_path / "in"), "s3://nowhere/out",
                           "--s3-endpoint", "http://127.0.0.1:9", "--executor", "local"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot reach the storage endpoint" in err[0], done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(storage.StorageUnavailable, match="cannot reach"):  # loads botocore's data files
        storage.probe("s3://nowhere/out", s3_endpoint="http://127.0.0.1:9", write=True)
    t0 = time.monotonic()  # the check alone (interpreter start and imports are slow on a loaded machine)
    with pytest.raises(storage.StorageUnavailable, match="cannot reach"):
        storage.probe("s3://nowhere/out", s3_endpoint="http://127.0.0.1:9", write=True)
    assert time.monotonic() - t0 < 5  # one short connect attempt, not 20 s of retries


@pytest.fixture()
def own_moto():
    """A moto server this test may stop and start again on the same port (moto's state lives in
    the process, so objects survive the outage, as a real store's would)."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="outage")
    state = {"server": server, "url": url, "port": port}

    def restart():
        state["server"] = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        state["server"].start()

    state["restart"] = restart
    yield state
    try:
        state["server"].stop()
    except Exception:
        pass
    mp.undo()


def test_storage_lost_mid_run_stops_then_rerun_finishes(own_moto, tmp_path, capsys):
    ids = _stacks(tmp_path / "in", 8, size=96)
    url = own_moto["url"]
    _s3fs(url).put(str(tmp_path / "in") + "/", "outage/in/", recursive=True)
    src, out = "s3://outage/in", str(tmp_path / "out")
    stop_after = {"n": 0}

    def outage(row):
        stop_after["n"] += 1
        if stop_after["n"] == 3:
            own_moto["server"].stop()

    from ray_mff.methods import get_fuser
    from ray_mff.stacks import discover_stacks

    storage.set_s3_endpoint(url)
    stacks = discover_stacks(src)
    t0 = time.monotonic()
    summary = runner.run_local(stacks, get_fuser("guided"), out, runner.RunOptions(recipe_id="r"),
                               progress=False, on_row=outage)
    seconds = time.monotonic() - t0
    assert summary.stopped == "storage" and summary.exit_code == runner.EXIT_STOPPED
    assert "cannot reach" in summary.stop_reason
    assert summary.fused == 3 and summary.failed == 1  # the stack in hand, recorded as a storage error
    assert seconds < 30  # stopped promptly: not 5-11 s per remaining stack
    assert _latest(out).loc[ids[3], "error_kind"] == "storage"
    own_moto["restart"]()
    summary = runner.run_local(discover_stacks(src), get_fuser("guided"), out, runner.RunOptions(recipe_id="r"),
                               progress=False)
    assert summary.fused == 5 and summary.skipped == 3 and summary.exit_code == 0
    _assert_all_done_once(Path(out), ids)


# ------------------------------------------------------------------- the same faults under the Ray executor


def _ray_fuse(src, out, *extra) -> int:
    return cli.main(["fuse", str(src), str(out), *GUIDED, "--executor", "ray", "--num-actors", "1",
                     "--flush-every", "1", *extra])


def _ok_rows_per_stack(out) -> dict:
    rows = manifest.read_manifest(str(out)).to_pandas()
    return rows[rows.status == "ok"].stack_id.value_counts().to_dict()


def test_storage_lost_mid_run_under_ray_stops_with_a_summary(ray_s3, own_moto, tmp_path, capsys, monkeypatch):
    """moto (INPUT and OUTPUT) stopped while the Ray executor writes to it: exit 4 with the summary,
    no traceback; moto back, the rerun finishes with exactly one ok output per stack."""
    import functools

    ids = _stacks(tmp_path / "in", 6, size=96)
    url = own_moto["url"]
    _s3fs(url).put(str(tmp_path / "in") + "/", "outage/ray-in/", recursive=True)  # moto's state is per process
    src, out = "s3://outage/ray-in", "s3://outage/ray-out"
    # the stopped run cannot delete its S3 lease while the store is down: it lapses after its ttl
    # (30 s by default; 3 s here), and the rerun waits for that (--wait)
    monkeypatch.setattr(lease, "acquire", functools.partial(lease.acquire, ttl=3.0, poll=0.5))
    # the CLI's logging writes to this test's captured stderr (not to a closed one of an earlier test)
    monkeypatch.setattr(logging.root, "handlers", [])
    stopped = {}

    def outage():  # the store goes away once two outputs are written
        fs = _s3fs(url)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                if len(fs.glob("outage/ray-out/s*.png")) >= 2:
                    break
            except Exception:  # noqa: BLE001 - not there yet
                pass
            fs.invalidate_cache()
            time.sleep(0.05)
        own_moto["server"].stop()
        stopped["at"] = time.monotonic()

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    code = _ray_fuse(src, out, "--s3-endpoint", url)
    seconds = time.monotonic() - stopped.get("at", time.monotonic())
    watcher.join(timeout=5)
    printed = capsys.readouterr()
    assert "at" in stopped, printed.out[-2000:]
    assert code == runner.EXIT_STOPPED, printed.out[-3000:] + printed.err[-3000:]
    assert f"stopped early ({out}: cannot reach" in printed.out
    assert printed.out.strip().splitlines()[-1].startswith("run ")
    assert "Traceback" not in printed.out + printed.err
    # promptly: a write fails after its retries (about 15 s here: 3 tries of the S3 client's own
    # attempts), the probe confirms the store is gone, one last flush, and the run ends
    assert seconds < 45
    own_moto["restart"]()
    storage.set_s3_endpoint(None)
    assert _fuse(src, out, "--s3-endpoint", url, "--wait") == 0  # the local loop: no second Ray Data start
    latest = _latest(out)
    assert sorted(latest.index) == ids and (latest.status == "ok").all()
    assert _ok_rows_per_stack(out) == {i: 1 for i in ids}  # one ok output (and row) per stack
    names = sorted(p.rsplit("/", 1)[-1] for p in _s3fs(url).find("outage/ray-out"))
    assert [n for n in names if n.endswith(".png")] == [f"{i}.png" for i in ids]
    assert not [n for n in names if "tmp" in n]


def _job_processes(job_hex: str) -> list[int]:
    """Pids of the processes Ray runs for job ``job_hex`` (workers carry ``RAY_JOB_ID``)."""
    needle = f"RAY_JOB_ID={job_hex}\0".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "environ").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_ray_driver_killed_takes_its_workers_along_then_rerun(ray_session, tmp_path):
    """``kill -9`` of a driver connected to a Ray cluster (as under ``ray job submit``): the job's
    actors and task workers end, nothing is written after that, and a rerun finishes the work."""
    ray = ray_session
    ids = _stacks(tmp_path / "in", 10, size=128)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ray_mff.cli", "fuse", str(tmp_path / "in"), str(out), *GUIDED,
           "--executor", "ray", "--num-actors", "1", "--flush-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("s*.png")):
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        jobs = [j for j in ray._private.state.state.job_table() if j["DriverPid"] == proc.pid]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(jobs) == 1
    job = jobs[0]["JobID"]

    def survivors() -> list:
        # Ray Data's detached helpers (its stats actor, the autoscaling coordinator) serve every
        # job on the cluster and outlive each by design; they write nothing. Everything else ends.
        detached = {a["Pid"] for a in ray._private.state.state.actor_table(None).values() if a["IsDetached"]}
        return [pid for pid in _job_processes(job) if pid not in detached]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and survivors():
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in survivors()}
    assert not left, f"processes of the killed driver's job still run: {left}"
    actors = [a for a in ray._private.state.state.actor_table(None).values()
              if a["JobID"] == job and not a["IsDetached"]]
    assert {a["ActorClassName"] for a in actors} >= {"AttemptLedger"} and len(actors) >= 2
    assert all(a["State"] == "DEAD" for a in actors), [(a["ActorClassName"], a["State"]) for a in actors]
    written = sorted(p.name for p in out.rglob("*"))
    time.sleep(2)
    assert sorted(p.name for p in out.rglob("*")) == written  # nothing writes after the workers ended
    assert 0 < len(list(out.glob("s*.png"))) < len(ids)
    assert _fuse(tmp_path / "in", out) == 0
    _assert_all_done_once(out, ids)
    assert len(manifest.read_manifest(str(out))) == len(ids)  # one row each: none lost, none doubled


def test_ray_worker_killed_mid_stack_is_retried_once_then_a_resource_error(ray_session, tmp_path):
    """A fusion worker SIGKILLs itself (as the OOM killer would) whenever it fuses the 80 px stack:
    that stack is tried twice, then becomes an error row (``resource``); the other stacks are fused
    and the job does not fail. (The whole-stack path, ``FusionActor``, asks the same ledger through
    ``process_stack``; its decision is tested without Ray below.)"""
    from ray_mff.pipeline import run_pipeline
    from ray_mff.stacks import discover_stacks

    ids = _stacks(tmp_path / "in", 3)
    victim = _stacks(tmp_path / "in", 1, size=80, prefix="big")[0]

    class DiesOn80px:  # defined here: cloudpickle ships it to the actors by value
        name = "guided"

        def __init__(self):
            from ray_mff.methods import get_fuser

            self.inner = get_fuser("guided")

        def fuse(self, images):
            if np.asarray(images[0]).shape[0] == 80:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.inner.fuse(images)

    out = tmp_path / "out"
    summary = run_pipeline(discover_stacks(str(tmp_path / "in")), {"name": "guided"}, str(out),
                           runner.RunOptions(recipe_id="r", compute_metrics=False), fuser_factory=DiesOn80px,
                           num_actors=1, flush_every=1)
    assert (summary.fused, summary.failed, summary.exit_code) == (3, 1, runner.EXIT_FAILED)
    latest = _latest(out)
    assert (latest.loc[ids, "status"] == "ok").all()
    assert latest.loc[victim, "error_kind"] == "resource" and "died twice" in latest.loc[victim, "error"]
    assert len(manifest.read_manifest(str(out))) == 4  # one row per stack
    fuse_actors = [a for a in ray_session._private.state.state.actor_table(None).values()
                   if "FuseStage" in a["ActorClassName"] and a["JobID"] == ray_session.get_runtime_context().get_job_id()]
    assert sum(a["NumRestarts"] for a in fuse_actors) == 2  # killed twice: the first try and one retry


# ----------------------------------------------------------------------------------- 8: the manifest


def test_manifest_compaction_schema_evolution_and_seq_order(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    ids = _stacks(tmp_path / "in", 4)
    # An old part written before error_kind/recipe_id/seq existed (as older ray-mff wrote them).
    old_schema = pa.schema([f for f in manifest.SCHEMA if f.name not in ("error_kind", "recipe_id", "seq")])
    import datetime as dt

    late_clock = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)  # a worker whose clock runs ahead
    old = pa.Table.from_pylist([{"run_id": "old", "stack_id": "s00", "status": "error", "error": "x: bad",
                                 "finished_at": late_clock, "source_uris": []}], schema=old_schema)
    (out / "manifest.parquet").mkdir(parents=True)
    pq.write_table(old, out / "manifest.parquet" / "part-old-00000.parquet")
    monkeypatch.setattr(manifest, "COMPACT_AFTER_PARTS", 3)
    assert _fuse(tmp_path / "in", out, "--flush-every", "1") == 0  # 4 parts + the old one: compacted at the end
    files = sorted(p.name for p in (out / "manifest.parquet").iterdir())
    assert files == ["gen-000001.parquet"]
    df = pd.read_parquet(out / "manifest.parquet")  # plain pandas reads it
    assert len(df) == 5 and df.seq.isna().sum() == 1 and df.recipe_id.isna().sum() == 1  # the old part reads
    # newest by seq, not by a worker's clock: s00's new ok row wins over the old row dated 2030
    assert _latest(out).loc["s00", "status"] == "ok"
    assert _fuse(tmp_path / "in", out, "--force", "--flush-every", "1") == 0
    assert cli.main(["manifest", "compact", str(out)]) == 0
    assert "-> " in capsys.readouterr().out
    files = sorted(p.name for p in (out / "manifest.parquet").iterdir())
    assert files == ["gen-000003.parquet"]  # the --force run compacted once by itself, then by hand
    table = pq.read_table(out / "manifest.parquet" / files[0])
    assert table.num_rows == 9 and table["stack_id"].to_pylist() == sorted(table["stack_id"].to_pylist())
    assert sorted(_latest(out).index) == ids and len(set(_latest(out).run_id)) == 1


def _old_planner():
    """The previous (per-stack loop) planner, kept in bench/manifest.py as the benchmark's baseline."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_manifest", REPO / "bench" / "manifest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.old_plan


def test_vectorised_plan_decides_as_the_stack_by_stack_plan(tmp_path):
    """The Arrow planner (list or listing-table input) against the old loop on a mixed manifest:
    every reason, the waiting errors, legacy rows, outputs outside OUTPUT, newest-by-seq, force."""
    import datetime as dt

    from ray_mff.stacks import Stack

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    stacks = [Stack(f"s{i:02d}", (f"/in/s{i:02d}_A.png", f"/in/s{i:02d}_B.png"),
                    {"sizes": (10, 11), "versions": ("1", str(i)), "folder": ""}) for i in range(18)]
    fp = {s.id: runner.source_fingerprint(s) for s in stacks}
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def row(sid, seq, **kw):
        path = out / f"{sid}.png"
        path.touch()
        return {"run_id": "r", "stack_id": sid, "source_fingerprint": fp[sid], "recipe_id": "R", "status": "ok",
                "output_uri": str(path), "seq": seq, "finished_at": now, **kw}

    rows = [row("s00", 0),                                                     # done: skipped
            row("s01", 1, output_uri=str(out / "gone.png")),                   # output missing
            row("s02", 2, source_fingerprint="other"),                         # input changed
            row("s03", 3, recipe_id="old"),                                    # recipe changed
            row("s04", 4, status="error", error="x", error_kind="storage"),    # retry storage error
            row("s05", 5, status="error", error="s05: corrupt", error_kind="input"),      # waits
            row("s06", 6, status="error", error="s06: died twice", error_kind="resource"),  # waits
            row("s07", 7, status="error", error="No space left on device"),    # no kind: storage by message
            row("s08", 8, status="error", error="s08: bad pixels", error_kind=""),  # no kind: input, waits
            row("s10", 9), row("s10", 10, status="error", error="e", error_kind="input"),  # newest wins: waits
            row("s11", 11, status="error", error="e", error_kind="input"), row("s11", 12),   # newest: ok
            row("s12", 13, output_uri=str(elsewhere / "s12.png")),            # outside OUTPUT: a HEAD, there
            row("s13", 14, output_uri=str(elsewhere / "nope.png")),           # outside OUTPUT, missing
            row("s14", 15, status="error", error="bug", error_kind="internal"),  # retry internal error
            row("s15", 16, output_uri=None),                                   # ok row without output
            row("s16", 17, output_uri=str(out / "sub" / "s16.png"))]          # in a sub-folder
    (elsewhere / "s12.png").touch()
    (out / "sub" / "s16.png").touch()
    # a row written before seq and recipes existed: its fingerprint is names + sizes (s09: new)
    legacy = {**row("s17", None, recipe_id=None), "source_fingerprint": runner.legacy_fingerprint(stacks[17])}
    manifest.write_part(str(out), rows + [legacy], "r", 0)
    old_plan = _old_planner()
    for opts in (runner.RunOptions(recipe_id="R"), runner.RunOptions(recipe_id="R", retry_errors=True),
                 runner.RunOptions(recipe_id=None), runner.RunOptions(recipe_id="other"),
                 runner.RunOptions(recipe_id="R", force=True)):
        todo, reasons, n_skipped, waiting = old_plan(stacks, str(out), opts)
        for given in (stacks, listing_of(iter(stacks), block_rows=5)):
            plan = runner.plan_stacks(given, str(out), opts)
            assert [s.id for s in plan.todo] == [s.id for s in todo] and plan.reasons == reasons, opts
            assert (plan.n_skipped, plan.waiting, plan.first_seq) == (n_skipped, waiting, 18)
            assert plan.todo == todo and [s.meta for s in plan.todo] == [s.meta for s in todo]  # round-trip
            assert {s.id for s in plan.skipped} == {s.id for s in stacks} - set(reasons)
    plan = runner.plan_stacks(stacks, str(out), runner.RunOptions(recipe_id="R"))
    assert plan.reasons == {"s01": "output missing", "s02": "input changed", "s03": "recipe changed",
                            "s04": "retry storage error", "s07": "retry storage error", "s09": "new",
                            "s13": "output missing", "s14": "retry internal error", "s15": "output missing"}
    assert plan.waiting == 4 and plan.n_skipped == 9  # s05 s06 s08 s10 wait; s00 s11 s12 s16 s17 done
    (out / "sub" / "s16.png").unlink()
    assert runner.plan_stacks(stacks, str(out), runner.RunOptions(recipe_id="R")).reasons["s16"] == "output missing"
    assert runner.plan_stacks(stacks, str(tmp_path / "new"), runner.RunOptions()).reasons == \
        {s.id: "new" for s in stacks}


# ------------------------------------------------------------------------------------- 9: memory


def test_memory_estimate_and_over_budget_stacks_tile(tmp_path, monkeypatch):
    _stacks(tmp_path / "in", 1, size=256)
    from ray_mff.stacks import discover_stacks

    stack = discover_stacks(str(tmp_path / "in"))[0]
    need = runner.estimate_stack_memory(stack)
    # two 256x256 RGB planes: samples + float maps per plane + the fused image, plus 256 MiB
    assert need == 256 * 256 * (2 * 3 * 2 + 2 * 4 * 3 + 3 * 4 * 2) + (256 << 20)
    tiled = []
    from ray_mff import tiling

    real = tiling.TiledFuser.fuse

    def spy(self, images):
        tiled.append(len(images))
        return real(self, images)

    monkeypatch.setattr(tiling.TiledFuser, "fuse", spy)
    monkeypatch.setattr(runner, "node_memory_budget", lambda: need - 1)
    out = tmp_path / "out"
    assert _fuse(tmp_path / "in", out) == 0
    assert tiled == [2]  # over the budget: the tiled path


def test_ledger_turns_a_second_worker_death_into_a_resource_error():
    from ray_mff.pipeline import AttemptLedger

    ledger = AttemptLedger()
    assert ledger.begin("a") == 0  # first attempt; its worker dies (no end)
    assert ledger.begin("a") == 1  # retried once; dies again
    assert ledger.begin("a") == 2  # -> process_stack writes an error row instead of fusing
    ledger.end("a")
    assert ledger.begin("b") == 0
    ledger.end("b")
    assert ledger.begin("b") == 0  # a stack fused again after finishing is not a death

    class Dying:
        def begin(self, sid):
            return 2

        def end(self, sid):
            pass

    from ray_mff.stacks import Stack

    row = runner.process_stack(Stack("x", ("nope.png",), {}), None, "/tmp/unused",
                               runner.RunOptions(attempt_ledger=Dying()))
    assert row["status"] == "error" and row["error_kind"] == "resource"


# --------------------------------------------------------------------------------------- 10: smaller


def test_output_folders_inside_input_and_output_equal_input(tmp_path, capsys):
    ids = _stacks(tmp_path / "in", 2)
    assert _fuse(tmp_path / "in", tmp_path / "in" / "earlier") == 0
    assert _fuse(tmp_path / "in", tmp_path / "elsewhere") == 0  # 'earlier' holds a manifest: not a stack
    assert sorted(_latest(tmp_path / "elsewhere").index) == ids
    capsys.readouterr()
    assert _fuse(tmp_path / "in", tmp_path / "in") == 2
    assert "OUTPUT is INPUT" in capsys.readouterr().err


def test_fuse_plans_from_the_streamed_listing_as_from_the_list(tmp_path):
    """``ray-mff fuse`` plans from discovery's listing table (no Stack object per stack); its manifest
    is the one the list path writes: same rows, same order, same decisions, OUTPUT's stacks left out."""
    from ray_mff.methods import get_fuser
    from ray_mff.stacks import discover_stacks

    src = tmp_path / "in"
    _stacks(src, 2)
    _stacks(src / "a b", 1, prefix="k")  # "a b/k00" and "a_b/k00": one id, made unique
    _stacks(src / "a_b", 1, prefix="k")
    (src / "notes.txt").write_text("not an image")  # an input error row
    out = src / "out"
    _stacks(out, 1, prefix="old")  # images already inside OUTPUT (no manifest yet): not stacks to fuse
    ref = tmp_path / "ref"
    args = cli.build_parser().parse_args(["fuse", str(src), str(out), *GUIDED, "--executor", "local"])
    opts = cli.run_options_from_args(args)
    opts.recipe_id = runner.recipe_id(cli.fuser_spec_from_args(args), opts)
    inside = str(out) + os.sep
    listed = [s for s in discover_stacks(str(src)) if not (s.uris and all(u.startswith(inside) for u in s.uris))]
    assert {"out", "out__old00"} & {s.id for s in discover_stacks(str(src))}
    runner.run_local(listed, get_fuser("guided"), str(ref), opts, progress=False)
    assert _fuse(src, out) == 1  # notes.txt is an error row

    keep = ["stack_id", "source_uris", "source_fingerprint", "status", "error", "error_kind", "n_images",
            "warning", "recipe_id", "seq"]

    def rows(root):
        table = manifest.latest_table(str(root)).sort_by("seq")
        frame = table.select(keep).to_pandas()
        frame["output"] = [u and os.path.basename(u) for u in table["output_uri"].to_pylist()]
        return frame.to_dict("records")

    got, want = rows(out), rows(ref)
    assert [r["stack_id"] for r in got] == ["a_b__k00", "a_b__k00-2", "notes.txt", "s00", "s01"]
    assert [{**r, "source_uris": list(r["source_uris"])} for r in got] == \
        [{**r, "source_uris": list(r["source_uris"])} for r in want]
    assert _fuse(src, out) == 0  # a rerun: everything done (the error waits for its input)


def test_read_only_output_is_found_before_fusing(tmp_path, capsys):
    _stacks(tmp_path / "in", 2)
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        assert _fuse(tmp_path / "in", ro) == 2
        err = capsys.readouterr().err
        assert "read-only file system" in err and len(err.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_trainer_filesystem_carries_no_keys(monkeypatch):
    pytest.importorskip("ray.train")
    from ray_mff.train.trainer import storage_filesystem

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADRIVERKEY0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "driver-secret-never-shipped")
    fs, _ = storage_filesystem("s3://bucket/runs", "http://127.0.0.1:9000")
    blob = pickle.dumps(fs)
    assert b"AKIADRIVERKEY0000001" not in blob and b"driver-secret-never-shipped" not in blob


# --------------------------------------------------------------------------------- the run report


def test_report_page_counts_failures_and_thumbnails(tmp_path, capsys):
    ids = _stacks(tmp_path / "in", 2)
    for name in ("b1", "b2"):
        (tmp_path / "in" / name).mkdir()
        (tmp_path / "in" / name / f"{name}_A.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        io.write_image(str(tmp_path / "in" / name / f"{name}_B.png"), np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "out"
    assert _fuse(tmp_path / "in", out, "--save-decision-maps") == 1
    assert cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "2 ok" in page and "2 failed (2 input)" in page
    assert "corrupt PNG" in page and "b1, b2" in page  # one reason, both stacks, file names left out
    assert page.count("data:image/png") == 2 * len(ids)  # fused image + decision map per ok stack
    sheet = io.read_image(str(out / "report.png"))
    assert sheet.ndim == 3 and sheet.shape[1] > 300
