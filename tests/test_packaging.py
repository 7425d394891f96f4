"""Packaging resolves to one consistent GPU stack: one ONNX Runtime flavour per install, and a
TensorRT and an onnxruntime-gpu built for the CUDA major of the torch that cluster.yaml installs."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _names(reqs: list[str]) -> list[str]:
    return [re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in reqs]


def test_each_install_gets_exactly_one_onnxruntime_flavour():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    flavours = {"onnxruntime", "onnxruntime-gpu"}
    assert not flavours & set(base), "the base install must not pick an ONNX Runtime flavour"
    assert [n for n in extras["cpu"] if n in flavours] == ["onnxruntime"]
    assert [n for n in extras["gpu"] if n in flavours] == ["onnxruntime-gpu"]
    assert not flavours & set(extras.get("test", []))


def test_gpu_extra_matches_the_cuda_major_of_cluster_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    trt = [r for r in gpu if r.lower().startswith("tensorrt")]
    assert len(trt) == 1 and re.match(r"tensorrt-cu(\d+)", trt[0]), "TensorRT must name its CUDA major"
    trt_cuda = re.match(r"tensorrt-cu(\d+)", trt[0]).group(1)
    cluster = (REPO / "cluster.yaml").read_text()
    torch_cuda = re.search(r"download\.pytorch\.org/whl/cu(\d+)", cluster).group(1)
    assert torch_cuda.startswith(trt_cuda), f"torch cu{torch_cuda} vs tensorrt-cu{trt_cuda}"
    # onnxruntime-gpu 1.27+ are CUDA 13 builds: a CUDA 12 stack holds it below 1.27
    ort = next(r for r in gpu if r.startswith("onnxruntime-gpu"))
    assert trt_cuda != "12" or "<1.27" in ort
    assert '"$HOME/ray-mff[gpu]"' in cluster and '"$HOME/ray-mff[cpu]"' in cluster


def test_docs_describe_the_stack_that_installs():
    for doc in ("README.md", "trt/README.md"):
        text = (REPO / doc).read_text()
        assert "ray-mff[gpu]" in text and "tensorrt-cu12" in text and "[tensorrt]" not in text, doc
