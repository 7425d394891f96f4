"""ONNX export: two single-file graphs with dynamic batch/height/width, verified against torch."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
import torch

from ray_mff import export
from ray_mff.engines.torch_engine import TorchEngine
from ray_mff.models import get_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_model("cascade", weights=None)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export.export_model(model, tmp_path_factory.mktemp("onnx32"), "fp32", name="cascade")


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_fp32_export_is_two_single_file_graphs_with_dynamic_axes(exported):
    folder = exported["encoder"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["decider.onnx", "encoder.onnx", "meta.json"]  # no external data
    enc, dec = onnx.load(str(exported["encoder"])), onnx.load(str(exported["decider"]))
    assert max(o.version for o in enc.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in enc.graph.input] == ["y"]
    assert [i.name for i in dec.graph.input] == ["feats_a", "feats_b", "y_a", "y_b"]
    assert _dims(enc.graph.input[0]) == ["batch", 1, "height", "width"]
    assert _dims(dec.graph.output[0]) == ["batch", 1, "height", "width"]
    assert exported["feature_channels"] == _dims(dec.graph.input[0])[1]


def test_fp32_export_matches_torch_on_random_and_real_inputs(exported):
    v = exported["verification"]
    assert set(v) == {"random", "real"}
    for kind in v:
        assert v[kind]["features_max_abs"] < 1e-4, v
        assert v[kind]["decision_max_abs"] < 1e-4, v


def test_onnx_graph_runs_at_other_sizes_and_batches(model, exported):
    from ray_mff.engines.onnx_engine import OnnxEngine

    eng = OnnxEngine(exported["encoder"], exported["decider"], threads=1)
    y = np.random.default_rng(1).random((3, 1, 33, 70), dtype=np.float32)
    f = eng.encode(y)
    d = eng.decide(f[:2], f[1:], y[:2], y[1:])
    ref = TorchEngine(model)  # the reference: pads to the stride and crops back like every engine
    ft = ref.encode(y)
    dt = ref.decide(ft[:2], ft[1:], y[:2], y[1:])
    assert d.shape == (2, 1, 33, 70)
    assert np.abs(d - dt).max() < 1e-4


def test_fp16_export_keeps_float32_io_and_stays_close(model, tmp_path):
    res = export.export_model(model, tmp_path, "fp16", name="cascade")
    enc = onnx.load(str(res["encoder"]))
    assert enc.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert enc.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in enc.graph.initializer)
    for kind, v in res["verification"].items():
        # fp16 tolerance (documented in the README/engines notes): features 1e-2, decisions 2e-2
        assert v["features_max_abs"] < 1e-2, (kind, v)
        assert v["decision_max_abs"] < 2e-2, (kind, v)


def test_cached_onnx_exports_once_under_concurrency(model, tmp_path, monkeypatch):
    calls = []
    real = export.export_model

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(export, "export_model", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(export.cached_onnx(model, "fp32", name="cascade",
                                                                                 root=tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({str(r["encoder"]) for r in results}) == 1
    assert results[0]["encoder"].is_file()
    leftovers = [p.name for p in (tmp_path / "onnx").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [results[0]["encoder"].parent.name]  # no temp folders left behind
    # a different state is a different key
    other = get_model("cascade", weights=None)
    assert export.cached_onnx(other, "fp32", name="cascade", root=tmp_path)["encoder"] != results[0]["encoder"]


def test_cli_export_prints_verification(tmp_path, capsys):
    from ray_mff.cli import main

    assert main(["export", "--model", "cascade", "--weights", "none", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "verify random" in out and "verify real" in out
    assert (tmp_path / "x" / "encoder.onnx").is_file() and (tmp_path / "x" / "decider.onnx").is_file()


def test_cli_export_tensorrt_without_tensorrt_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    from ray_mff.cli import main

    code = main(["export", "--model", "cascade", "--format", "tensorrt", "--weights", "none", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ray-mff: tensorrt:") and "not installed" in err[0]


def test_cli_exports_the_default_stack_native_model(tmp_path, capsys):
    """The default model is stack-native: its three graphs (encoder, joint, decision alone),
    checked against torch; TensorRT or fp16 for it is a one-line setup error, not a traceback."""
    pytest.importorskip("onnxruntime")
    from ray_mff.cli import main
    from ray_mff.models import DEFAULT_MODEL

    assert main(["export", "--weights", "none", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"encoder.onnx", "joint.onnx", "decide.onnx", "meta.json"}
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("verify")]
    assert out.startswith(DEFAULT_MODEL) and len(diffs) == 2 and max(diffs) < 1e-4
    assert main(["export", "--precision", "fp16", "--weights", "none", "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stack-native" in err[0]


@pytest.mark.parametrize("name", ["cnn", "mscnn", "ssim"])
def test_every_registered_model_exports(name, tmp_path):
    """Every registered model exports with dynamic sizes and matches torch (small random input)."""
    from ray_mff.engines.base import pad_to_multiple
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.models import list_models

    if name not in list_models():
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(0)
    net = get_model(name, weights=None)
    res = export.export_model(net, tmp_path, "fp32", name=name, verify=False)
    eng = OnnxEngine(res["encoder"], res["decider"], stride=res["stride"], threads=1)
    y = np.random.default_rng(0).random((2, 1, 45, 58), dtype=np.float32)
    f = eng.encode(y)
    d = eng.decide(f[:1], f[1:], y[:1], y[1:])
    yp = torch.from_numpy(pad_to_multiple(y, res["stride"]))
    with torch.no_grad():
        ft = net.encode(yp)
        dt = net.decide(ft[:1], ft[1:], yp[:1], yp[1:])[..., :45, :58].numpy()
    assert d.shape == (1, 1, 45, 58)
    assert np.abs(d - dt).max() < 1e-4
