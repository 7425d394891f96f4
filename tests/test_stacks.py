"""ray_mff.stacks: every layout and built-in pattern, user regexes, natural order, error rows, S3.

Discovery never reads pixels, so most tests create empty files named like images.
"""
from __future__ import annotations

import numpy as np
import pytest

from ray_mff import io as rio
from ray_mff.errors import EmptyStackError, NotAnImageError
from ray_mff.stacks import Stack, discover_stacks, natural_key, safe_id


def touch(root, *names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return root


def by_id(stacks: list[Stack]) -> dict[str, Stack]:
    return {s.id: s for s in stacks}


def names(stack: Stack) -> list[str]:
    return [u.replace("\\", "/").rsplit("/", 1)[-1] for u in stack.uris]


def ok(stacks):
    return [s for s in stacks if "error" not in s.meta]


def errors(stacks):
    return {s.id: s.meta["error"] for s in stacks if "error" in s.meta}


# --------------------------------------------------------------------------- natural order, ids


def test_natural_key():
    assert sorted(["10", "2", "1"], key=natural_key) == ["1", "2", "10"]
    assert sorted(["C", "a", "B"], key=natural_key) == ["a", "B", "C"]
    assert sorted(["z010", "z2", "z1"], key=natural_key) == ["z1", "z2", "z010"]
    assert sorted(["img10_b", "img2_c", "img2_a"], key=natural_key) == ["img2_a", "img2_c", "img10_b"]


def test_safe_id():
    assert safe_id("my scene (1)") == "my_scene_1"
    assert safe_id("../..//x") == "x"
    assert safe_id("Ärzte-Probe.3") == "Ärzte-Probe.3"
    assert safe_id("///") == "stack"


# --------------------------------------------------------------------------- built-in patterns (flat root)


def test_letter_pairs_lytro_style(tmp_path):
    touch(tmp_path, *[f"lytro_{i:02d}_{c}.png" for i in (1, 2, 10) for c in "BA"])
    stacks = discover_stacks(tmp_path)
    assert [s.id for s in stacks] == ["lytro_01", "lytro_02", "lytro_10"]
    s = stacks[0]
    assert names(s) == ["lytro_01_A.png", "lytro_01_B.png"]
    assert s.meta["layout"] == "pattern" and s.meta["pattern"] == "letter"
    assert s.meta["indices"] == ("A", "B") and s.meta["sizes"] == (0, 0)
    assert all(u.startswith(str(tmp_path)) for u in s.uris)


def test_dash_letters_triples(tmp_path):
    touch(tmp_path, *[f"lytro-0{i}-{c}.jpg" for i in (1, 2) for c in "CAB"])
    stacks = discover_stacks(tmp_path)
    assert [s.id for s in stacks] == ["lytro-01", "lytro-02"]
    assert names(stacks[1]) == ["lytro-02-A.jpg", "lytro-02-B.jpg", "lytro-02-C.jpg"]


def test_numbered_members_natural_order(tmp_path):
    touch(tmp_path, *[f"scene_{i}.tif" for i in (10, 2, 1, 3)], *[f"other-{i}.PNG" for i in (2, 1)])
    s = by_id(discover_stacks(tmp_path))
    assert s["scene"].meta["indices"] == ("1", "2", "3", "10")
    assert s["scene"].meta["pattern"] == "number"
    assert names(s["other"]) == ["other-1.PNG", "other-2.PNG"]


def test_z_planes(tmp_path):
    touch(tmp_path, *[f"beetle_z{i:03d}.tif" for i in (12, 3, 100)], "moth-Z1.tif", "moth-Z2.tif")
    s = by_id(discover_stacks(tmp_path))
    assert s["beetle"].meta["indices"] == ("003", "012", "100")
    assert s["beetle"].meta["pattern"] == "z-plane"
    assert len(s["moth"].uris) == 2


def test_microscopy_z_and_channel_keeps_channels_apart(tmp_path):
    touch(tmp_path, *[f"sample7_z{z:03d}_c{c}.tif" for z in (3, 1, 2) for c in (1, 2)])
    stacks = discover_stacks(tmp_path)
    assert [s.id for s in stacks] == ["sample7_c1", "sample7_c2"]
    assert names(stacks[0]) == ["sample7_z001_c1.tif", "sample7_z002_c1.tif", "sample7_z003_c1.tif"]
    assert stacks[0].meta["pattern"] == "z-plane+tags"


def test_micromanager_names(tmp_path):
    files = [
        f"img_channel{c:03d}_position{p:03d}_time{t:09d}_z{z:03d}.tif"
        for c in (0, 1)
        for p in (0,)
        for t in (0, 1)
        for z in (2, 0, 1)
    ]
    touch(tmp_path, *files)
    stacks = discover_stacks(tmp_path)
    assert [s.id for s in stacks] == [
        "img_channel000_position000_time000000000",
        "img_channel000_position000_time000000001",
        "img_channel001_position000_time000000000",
        "img_channel001_position000_time000000001",
    ]
    assert all(s.meta["pattern"] == "micromanager" and s.meta["indices"] == ("000", "001", "002") for s in stacks)


def test_flat_root_of_one_stack_is_named_by_pattern(tmp_path):
    touch(tmp_path, "scene_A.png", "scene_B.png")
    assert [s.id for s in discover_stacks(tmp_path)] == ["scene"]


# --------------------------------------------------------------------------- folder layout


def test_folder_per_stack(tmp_path):
    touch(tmp_path, "sceneA/left.png", "sceneA/right.png", "sceneB/1.jpg", "sceneB/10.jpg", "sceneB/2.jpg")
    s = by_id(discover_stacks(tmp_path))
    assert set(s) == {"sceneA", "sceneB"}
    assert s["sceneB"].meta["layout"] == "folder" and s["sceneB"].meta["folder"] == "sceneB"
    assert names(s["sceneB"]) == ["1.jpg", "2.jpg", "10.jpg"]


def test_folder_whose_names_share_one_stack_key_is_one_stack(tmp_path):
    touch(tmp_path, "scene1/img_1.png", "scene1/img_2.png", "scene1/img_10.png")
    (s,) = discover_stacks(tmp_path)
    assert s.id == "scene1" and s.meta["layout"] == "folder"
    assert s.meta["indices"] == ("1", "2", "10")


def test_numbered_sequence_without_separator_is_one_stack(tmp_path):
    """stack_v4 (V001.jpg..V065.jpg): one stack whether it is a sub-folder or the root itself."""
    touch(tmp_path, *[f"stack_v4/V{i:03d}.jpg" for i in range(65, 0, -1)])
    (s,) = discover_stacks(tmp_path)
    assert s.id == "stack_v4" and len(s.uris) == 65
    assert names(s)[:3] == ["V001.jpg", "V002.jpg", "V003.jpg"] and names(s)[-1] == "V065.jpg"
    (s2,) = discover_stacks(tmp_path / "stack_v4")
    assert s2.id == "stack_v4" and s2.uris == s.uris


def test_subfolder_holding_many_stacks_uses_patterns(tmp_path):
    touch(tmp_path, *[f"lytro/lytro_0{i}_{c}.png" for i in (1, 2) for c in "AB"], "v/V1.jpg", "v/V2.jpg")
    s = by_id(discover_stacks(tmp_path))
    assert set(s) == {"lytro__lytro_01", "lytro__lytro_02", "v"}
    assert s["lytro__lytro_01"].meta["folder"] == "lytro"


def test_nested_folders(tmp_path):
    touch(tmp_path, "site1/scene 1/a.png", "site1/scene 1/b.png", "site2/x/a.tif", "site2/x/b.tif")
    assert [s.id for s in discover_stacks(tmp_path)] == ["site1__scene_1", "site2__x"]


def test_hidden_files_and_folders_are_ignored(tmp_path):
    touch(tmp_path, "p_A.png", "p_B.png", ".DS_Store", "._p_A.png", ".p_A.png.1234.tmp", ".cache/q_A.png")
    (s,) = discover_stacks(tmp_path)
    assert s.id == "p" and names(s) == ["p_A.png", "p_B.png"]


# --------------------------------------------------------------------------- user patterns


def test_user_regex_with_stack_and_index(tmp_path):
    touch(tmp_path, "focus-003-wing.png", "focus-1-wing.png", "focus-2-leg.png", "focus-10-leg.png", "readme.png")
    stacks = discover_stacks(tmp_path, r"focus-(?P<index>\d+)-(?P<stack>\w+)")
    s = by_id(stacks)
    assert names(s["wing"]) == ["focus-1-wing.png", "focus-003-wing.png"]
    assert names(s["leg"]) == ["focus-2-leg.png", "focus-10-leg.png"]
    assert s["wing"].meta["pattern"] == "user"
    assert errors(stacks) == {"readme.png": "file name does not match the stack pattern: cannot tell its stack"}


def test_user_regex_may_include_the_extension(tmp_path):
    touch(tmp_path, "a.1.tif", "a.2.tif")
    (s,) = discover_stacks(tmp_path, r"(?P<stack>\w+)\.(?P<index>\d+)\.tif")
    assert s.id == "a" and s.meta["indices"] == ("1", "2")


def test_user_regex_with_index_only_orders_folder_stacks(tmp_path):
    touch(tmp_path, "s1/shot-b-0009.png", "s1/shot-a-0010.png", "s1/shot-c-0001.png")
    (s,) = discover_stacks(tmp_path, r".*-(?P<index>\d+)")
    assert s.id == "s1" and names(s) == ["shot-c-0001.png", "shot-b-0009.png", "shot-a-0010.png"]


def test_user_regex_needs_index_group(tmp_path):
    with pytest.raises(ValueError, match="index"):
        discover_stacks(tmp_path, r"(?P<stack>.+)_\d+")


# --------------------------------------------------------------------------- warnings and error rows


def test_one_image_stack_passes_with_warning(tmp_path):
    touch(tmp_path, "solo_A.png", "pair_A.png", "pair_B.png")
    s = by_id(discover_stacks(tmp_path))
    assert len(s["solo"].uris) == 1 and "one image" in s["solo"].meta["warning"]
    assert "error" not in s["solo"].meta
    assert "warning" not in s["pair"].meta


def test_empty_folder_is_an_error_row(tmp_path):
    touch(tmp_path, "full/a.png", "full/b.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "parent" / "empty_child").mkdir(parents=True)
    stacks = discover_stacks(tmp_path)
    errs = errors(stacks)
    assert set(errs) == {"empty", "parent__empty_child"}
    assert "empty folder" in errs["empty"]
    assert by_id(stacks)["empty"].uris == ()
    assert [s.id for s in ok(stacks)] == ["full"]


def test_empty_root_is_an_error_row_and_missing_root_raises(tmp_path):
    (tmp_path / "void").mkdir()
    (s,) = discover_stacks(tmp_path / "void")
    assert s.id == "void" and s.uris == () and "empty" in s.meta["error"]
    with pytest.raises(EmptyStackError, match="no such folder"):
        discover_stacks(tmp_path / "does-not-exist")
    touch(tmp_path, "file.png")
    with pytest.raises(EmptyStackError):
        discover_stacks(tmp_path / "file.png")


def test_unmatched_image_among_pattern_files_is_an_error_row(tmp_path):
    touch(tmp_path, "p_A.png", "p_B.png", "cover.png")
    stacks = discover_stacks(tmp_path)
    errs = errors(stacks)
    assert errs == {"cover.png": "file name matches no built-in stack pattern: cannot tell its stack"}
    row = by_id(stacks)["cover.png"]
    assert row.meta["layout"] == "file" and names(row) == ["cover.png"]


def test_text_file_in_stack_folder_is_its_own_error_row(tmp_path):
    touch(tmp_path, "scene/a.png", "scene/b.png", "scene/notes.txt")
    stacks = discover_stacks(tmp_path)
    s = by_id(stacks)
    assert names(s["scene"]) == ["a.png", "b.png"] and "error" not in s["scene"].meta
    assert "not an image file (.txt)" in s["scene__notes.txt"].meta["error"]
    assert names(s["scene__notes.txt"]) == ["notes.txt"]


def test_non_image_named_as_missing_member_joins_and_fails_on_read(tmp_path):
    """foo_B.txt beside foo_A.png claims focal plane B: the stack's read names that file."""
    rio.write_image(tmp_path / "foo_A.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "foo_B.txt").write_text("not pixels")
    (s,) = discover_stacks(tmp_path)
    assert s.id == "foo" and names(s) == ["foo_A.png", "foo_B.txt"]
    with pytest.raises(NotAnImageError) as e:
        rio.read_stack(s.uris)
    assert e.value.uri.endswith("foo_B.txt")


def test_sidecar_of_an_existing_member_is_its_own_row(tmp_path):
    touch(tmp_path, "foo_A.png", "foo_B.png", "foo_A.json", "bar_1.csv")
    stacks = discover_stacks(tmp_path)
    s = by_id(stacks)
    assert names(s["foo"]) == ["foo_A.png", "foo_B.png"] and "error" not in s["foo"].meta
    assert set(errors(stacks)) == {"foo_A.json", "bar_1.csv"}


def test_duplicate_index_is_an_error(tmp_path):
    touch(tmp_path, "foo_A.png", "foo_A.jpg", "foo_B.png")
    (s,) = discover_stacks(tmp_path)
    assert "foo_A.jpg" in s.meta["error"] and "foo_A.png" in s.meta["error"]


def test_ids_unique_and_safe(tmp_path):
    touch(tmp_path, "x/p_A.png", "x/p_B.png", "x/q_A.png", "x/q_B.png", "x__p_A.png", "x__p_B.png")
    touch(tmp_path, "odd name!/a.png", "odd name!/b.png")
    stacks = discover_stacks(tmp_path)
    ids = [s.id for s in stacks]
    assert len(ids) == len(set(ids))
    assert set(ids) == {"x__p", "x__p-2", "x__q", "odd_name"}
    assert all(safe_id(i) == i for i in ids)
    assert ids == sorted(ids, key=natural_key)


# --------------------------------------------------------------------------- shared data and S3


def test_shared_data_layouts(shared_data):
    lytro = discover_stacks(shared_data / "lytro")
    assert len(lytro) == 20 and all(len(s.uris) == 2 and not errors([s]) for s in lytro)
    assert lytro[0].id == "lytro_01" and lytro[-1].id == "lytro_20"
    triple = discover_stacks(shared_data / "lytro_triple")
    assert [len(s.uris) for s in triple] == [3, 3, 3, 3]
    (v4,) = discover_stacks(shared_data / "stack_v4")
    assert v4.id == "stack_v4" and len(v4.uris) == 65 and v4.uris[0].endswith("V001.jpg")
    a, b = rio.read_stack(lytro[0].uris)
    assert a.shape == b.shape == (520, 520, 3) and a.dtype == np.uint8


def test_s3_discovery(s3_server, s3_bucket):
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    png = rio.encode_image(np.full((6, 5, 3), 7, np.uint8), "png")
    for key in ("in/lytro_01_A.png", "in/lytro_01_B.png", "in/v4/V1.jpg", "in/v4/V2.jpg", "in/notes.txt",
                "other/x_A.png"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=png)
    client.put_object(Bucket=s3_bucket, Key="in/empty/", Body=b"")

    stacks = discover_stacks(f"s3://{s3_bucket}/in", s3_endpoint=s3_server)
    s = by_id(stacks)
    assert set(s) == {"lytro_01", "v4", "notes.txt", "empty"}
    assert s["lytro_01"].uris == (f"s3://{s3_bucket}/in/lytro_01_A.png", f"s3://{s3_bucket}/in/lytro_01_B.png")
    assert s["lytro_01"].meta["sizes"] == (len(png), len(png))
    assert s["v4"].meta["layout"] == "folder" and len(s["v4"].uris) == 2
    assert "error" in s["notes.txt"].meta and "error" in s["empty"].meta
    img = rio.read_image(s["lytro_01"].uris[1], s3_endpoint=s3_server)
    assert img.shape == (6, 5, 3)

    # A trailing slash or a bucket root works too.
    assert [x.id for x in discover_stacks(f"s3://{s3_bucket}/in/", s3_endpoint=s3_server)] == sorted(s, key=natural_key)
    # From the bucket root, "in/" holds a single stack key (lytro_01), so it is a folder stack.
    whole = by_id(discover_stacks(f"s3://{s3_bucket}", s3_endpoint=s3_server))
    assert set(whole) == {"in", "in__v4", "in__notes.txt", "in__empty", "other"}
    assert whole["in"].uris == s["lytro_01"].uris and "warning" in whole["other"].meta


# --------------------------------------------------------------------------- streamed listing (archive scale)

MIXED_TREE = ("lytro_01_A.png", "lytro_01_B.png", "notes.txt", "foo_A.png", "foo_B.txt", "solo.png",
              "scene1/img_1.png", "scene1/img_2.png", "scene1/.hidden.png", "pairs/a_1.png", "pairs/a_2.png",
              "pairs/b_1.png", "pairs/b_2.png", "container/sub/x_1.png", "container/sub/x_2.png", ".thumbs/t_1.png",
              "zs/sample.ome.tif", "zs/p_z001.ome.tif", "zs/p_z002.ome.tif", "img.zarr/.zattrs", "img.zarr/0/.zarray",
              "img.zarr/0/0.0", "plate.zarr/A/1/0/.zarray", "plate.zarr/A/1/labels/0/.zarray",
              "prev/manifest.parquet/part-0.parquet", "prev/x_1.png", "prev/a/c_1.png", "a b/k_1.png", "a b/k_2.png",
              "a_b/k_1.png", "a_b/k_2.png", "a_b-2/z.png", "dupidx/f_A.png", "dupidx/f_A.jpg", "mixed/q_1.png",
              "mixed/notes.md", "deep/er/than/s_10.png", "deep/er/than/s_9.png", "deep/er/w.txt", "v/a.czi",
              "x/y/manifest.parquet/part.parquet", "x/y/q_1.png", "x/z_1.png", "empty/")


def _mixed_tree(root):
    """Every rule at once: root pattern pairs and strays, folder and pattern sub-folders, single-file
    stacks (OME-TIFF, vendor, OME-Zarr image and plate), hidden names, earlier outputs (``prev``,
    ``x/y``), clashing ids (``a b`` / ``a_b`` / ``a_b-2``), duplicate members, empty folders."""
    for i, name in enumerate(MIXED_TREE):
        p = root / name
        if name.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x" * i)
    return root


def _upload(root, client, bucket, prefix):
    for p in sorted(root.rglob("*")):
        key = f"{prefix}/{p.relative_to(root).as_posix()}"
        body = b"" if p.is_dir() else p.read_bytes()
        client.put_object(Bucket=bucket, Key=key + ("/" if p.is_dir() else ""), Body=body)


@pytest.mark.parametrize("options", [{}, {"stack_per_file": True}, {"pattern": r"(?P<stack>.+)_(?P<index>\d+)"}])
def test_streamed_listing_equals_the_list(tmp_path, options):
    from ray_mff.listing import discover_listing, stack_json

    root = _mixed_tree(tmp_path / "in")
    stacks = discover_stacks(root, **options)
    ids = [s.id for s in stacks]
    assert "img" in ids and not any(i.startswith(("prev", "x__y")) for i in ids)  # earlier outputs left out
    if not options:  # the built-in rules: every kind of row is there
        assert {"a_b", "a_b-2", "a_b-3", "x", "zs__sample", "v__a", "empty", "plate__A__1", "notes.txt"} <= set(ids)
    listing = discover_listing(root, **options, block_rows=4)  # several compressed blocks
    assert listing.ids.to_pylist() == ids
    assert [stack_json(s) for s in listing.stacks()] == [stack_json(s) for s in stacks]  # uris, meta, renames
    assert [s.id for s in listing.stacks([3, 0, 5])] == [ids[3], ids[0], ids[5]]
    leave = discover_listing(root, **options, leave_out=lambda s: "/pairs/" in "".join(s.uris))
    assert leave.ids.to_pylist() == [i for i in ids if not i.startswith("pairs__")]
    empty = discover_listing(tmp_path / "in" / "empty")
    assert [stack_json(s) for s in empty.stacks()] == [stack_json(s) for s in discover_stacks(tmp_path / "in" / "empty")]


@pytest.mark.parametrize("options", [{}, {"pattern": r"(?P<stack>.+)_(?P<index>\d+)"}])
def test_parallel_discovery_equals_one_process(tmp_path, options, caplog):
    """Sub-folders shared out over worker processes (forced here: the bar is 32768 sub-folders) give
    the same listing as one process: earlier outputs, zarr stores, clashing ids, empty folders, the
    root's own files, OUTPUT under INPUT (a picklable leave_out)."""
    from ray_mff import cli
    from ray_mff.listing import discover_listing, stack_json

    root = _mixed_tree(tmp_path / "in")
    (root / "fused" / "manifest.parquet").mkdir(parents=True)
    (root / "fused" / "manifest.parquet" / "part-r-00000.parquet").write_bytes(b"x")
    (root / "fused" / "s1.png").write_bytes(b"x")
    leave = cli._in_output(str(root), str(root / "fused"))
    one = discover_listing(root, **options, leave_out=leave, workers=1)
    with caplog.at_level("INFO", logger="ray_mff"):
        many = discover_listing(root, **options, leave_out=leave, workers=2, parallel_min=2, block_rows=3)
    assert "over 2 processes" in caplog.text
    assert len(one) > 20 and not any(i.startswith("fused") for i in one.ids.to_pylist())
    assert many.ids.equals(one.ids) and many.fingerprints.equals(one.fingerprints)
    assert [stack_json(s) for s in many.stacks()] == [stack_json(s) for s in one.stacks()]


def test_a_listing_makes_the_stacks_to_fuse_as_they_are_reached(monkeypatch):
    """Plan.todo from a listing is a sequence whose Stack objects are made a chunk at a time as the
    loop reaches them (a first run over a million stacks never holds a million of them)."""
    from ray_mff import listing

    stacks = [Stack(f"s{i:03d}", (f"/in/s{i:03d}/a.png", f"/in/s{i:03d}/b.png"), {"sizes": (i, i), "folder": f"s{i:03d}"})
              for i in range(40)]
    made = []
    real = listing.Listing.stacks
    monkeypatch.setattr(listing.Listing, "stacks", lambda self, index=None: made.append(len(index)) or real(self, index))
    monkeypatch.setattr(listing, "ITER_CHUNK", 8)
    todo = listing.listing_of(reversed(stacks), block_rows=7).lazy(np.arange(3, 30))
    assert len(todo) == 27 and made == []
    it = iter(todo)
    assert next(it) == stacks[3] and made == [8]  # the first chunk only
    assert list(todo) == stacks[3:30] and todo == stacks[3:30] and todo != stacks[3:31]
    assert todo[0] == stacks[3] and todo[-1] == stacks[29] and list(todo[2:5]) == stacks[5:8]


def test_a_discovery_worker_error_is_raised_here():
    """What a worker process raises comes back and is raised in the caller, as one process would."""
    from ray_mff import listing

    with pytest.raises(ValueError, match="local folders only"):
        listing._discover_in_parallel(listing._Builder(None, 4), set(), ["a", "b"], 2,
                                      ("memory://nowhere", None, False, None, 4))


def test_folder_listing_equals_walk_locally(tmp_path):
    from ray_mff import storage

    root = _mixed_tree(tmp_path / "in")
    (root / "scene1" / "link.png").symlink_to(root / "lytro_01_A.png")  # size: the target's; mtime: its own
    (root / "linked_dir").symlink_to(root / "pairs")  # fsspec lists a dir symlink as a file, not a folder
    files, dirs = storage.walk(str(root))
    folders = list(storage.iter_folders(str(root)))
    assert sorted(e for _, fs in folders for e in fs) == files
    assert sorted(f for f, _ in folders if f) == dirs and folders[-1][0] == ""
    done = set()
    for folder, _ in folders:  # each folder after all of its sub-folders
        assert not any(d.startswith(folder + "/") and d not in done for d in dirs if folder)
        done.add(folder)


def test_streamed_listing_on_s3_pages(tmp_path, s3_server, s3_bucket, monkeypatch):
    import boto3

    from ray_mff import storage
    from ray_mff.listing import discover_listing, stack_json

    _upload(_mixed_tree(tmp_path / "in"), boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1"),
            s3_bucket, "in")
    monkeypatch.setattr(storage, "S3_LIST_PAGE", 7)  # many pages: folders span page boundaries
    root = f"s3://{s3_bucket}/in"
    files, dirs = storage.walk(root, s3_endpoint=s3_server)
    folders = list(storage.iter_folders(root, s3_endpoint=s3_server))
    assert sorted(e for _, fs in folders for e in fs) == files
    assert sorted(f for f, _ in folders if f) == dirs and folders[-1][0] == ""
    local = discover_stacks(tmp_path / "in")
    remote = discover_stacks(root, s3_endpoint=s3_server)
    assert [s.id for s in remote] == [s.id for s in local]
    listing = discover_listing(root, s3_endpoint=s3_server, block_rows=5)
    assert [stack_json(s) for s in listing.stacks()] == [stack_json(s) for s in remote]


def test_natural_sort_text_sorts_as_natural_key():
    from ray_mff.stacks import natural_sort_text

    names = ["a", "B", "b", "z10", "z2", "z02", "z2a", "Z2", "img10_b", "img2_c", "img2_a", "0", "00", "01", "1",
             "x-2", "x", "x-10", "x_2", "ß", "SS", "ss", "a1b2", "a1b", "a01b", "é", "E", "", "9" * 30, "99", "a.b"]
    assert sorted(names, key=natural_sort_text) == sorted(names, key=natural_key)


def test_a_folder_holding_only_single_file_stacks_is_not_empty(tmp_path):
    """x/a.ome.tif (or a vendor file, or an OME-Zarr store) is a stack of its own; its folder is no
    "empty folder" error row beside it (a nightly run exited 1 for it). A truly empty folder still is."""
    from ray_mff.listing import discover_listing

    for name in ("x/a.ome.tif", "v/c.czi", "w/b.zarr/.zattrs", "w/b.zarr/0/.zarray", "w/b.zarr/0/0.0", "empty/"):
        p = tmp_path / "in" / name
        if name.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    stacks = {s.id: s for s in discover_stacks(tmp_path / "in")}
    assert set(stacks) == {"x__a", "v__c", "w__b", "empty"}
    assert [i for i, s in stacks.items() if s.meta.get("error")] == ["empty"]
    assert sorted(discover_listing(tmp_path / "in").ids.to_pylist()) == sorted(stacks)
