"""Registered pyfunc models: weights as artifacts, aliases, and `mlflow models serve` answering like in-process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ms2rgb.models.bands import RGB_BANDS
from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig
from ms2rgb.models.clip_backbone import TINY_MODEL, load_clip
from ms2rgb.models.clip_detector import ClassMapDetector
from ms2rgb.models.clip_prompt import PromptConfig, PromptedCLIP
from ms2rgb.tasks import tracking
from ms2rgb.tasks.data.classes import SURFACE_CLASSES, SURFACE_NAMES
from ms2rgb.tasks.errors import Ms2rgbError
from ms2rgb.tasks.tracking.pyfunc import LandCoverPyfunc, SceneClassifierPyfunc, detector_artifacts
from ms2rgb.tasks.training.store import save_model

BIN = Path(sys.executable).parent  # the venv's bin: mlflow, and the uvicorn the scoring server starts
STUDENT, DETECTOR = "test-student", "test-detector"


def _tiles(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size)).astype(np.float32)


def _student_file(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = SceneCNN(SceneCNNConfig(bands=RGB_BANDS, n_classes=4, width=4, from_8bit=True))
    return save_model(out / f"student{seed}" / "model.pt", "scene_cnn", model, model.cfg)


def _detector_file(out: Path) -> Path:
    """detector.pt + backbone.pt as the detector stage writes them after the fallback pretraining."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip, tokenizer, _ = load_clip(TINY_MODEL, None)
    torch.save(clip.state_dict(), out / "backbone.pt")
    prompted = PromptedCLIP(clip, PromptConfig(n_ctx=2, depth=2, similarity_layers=(2, 3)))
    texts = list(SURFACE_CLASSES.values())
    detector = ClassMapDetector(prompted, tokenizer(texts), SURFACE_NAMES, texts, TINY_MODEL)
    payload = {
        "clip_model": TINY_MODEL,
        "clip_pretrained": "backbone.pt",
        "pretrained_in_artifacts": True,
        "weights": "fallback:test",
        "prompt_config": dataclasses.asdict(prompted.cfg),
        "prompt_state": prompted.prompt_state_dict(),
        "class_names": detector.class_names,
        "texts": detector.texts,
    }
    torch.save(payload, out / "detector.pt")
    return out / "detector.pt"


def _register_student(root: Path, seed: int = 0) -> int:
    with tracking.stage_run(root, "ms2rgb", "student") as tracker:
        version = tracker.log_pyfunc_model(
            SceneClassifierPyfunc(), {"model": _student_file(root / "files", seed)}, _tiles(2), STUDENT
        )
    assert version is not None
    return int(version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project store holding one tiny student and one tiny detector, each as champion."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        _register_student(root)
        with tracking.stage_run(root, "ms2rgb", "detector") as tracker:
            detector_file = _detector_file(root / "files" / "detector")
            version = tracker.log_pyfunc_model(
                LandCoverPyfunc(),
                detector_artifacts(detector_file, root),
                _tiles(1),
                DETECTOR,
                any_size=True,
                metadata={"class_names": list(SURFACE_NAMES)},
            )
        for name in (STUDENT, DETECTOR):
            tracking.set_alias(root, name, tracking.CHAMPION, 1)
        assert version == 1
        yield root


# ------------------------------------------------------------------------------- registry, in process


def test_registration_sets_challenger_and_set_alias_moves_champion(tmp_path: Path) -> None:
    root = tmp_path / "project"
    assert tracking.version_by_alias(root, STUDENT, tracking.CHALLENGER) is None  # no store: None, none created
    assert not (root / "mlflow.db").exists()
    assert _register_student(root, seed=0) == 1
    assert tracking.version_by_alias(root, STUDENT, tracking.CHALLENGER) == 1
    assert tracking.version_by_alias(root, STUDENT, tracking.CHAMPION) is None
    assert tracking.version_by_alias(root, "no-such-model", tracking.CHAMPION) is None
    tracking.set_alias(root, STUDENT, tracking.CHAMPION, 1)
    assert _register_student(root, seed=1) == 2  # the newest version is the challenger, the champion stays
    assert tracking.version_by_alias(root, STUDENT, tracking.CHALLENGER) == 2
    assert tracking.version_by_alias(root, STUDENT, tracking.CHAMPION) == 1
    tracking.set_alias(root, STUDENT, tracking.CHAMPION, 2)
    assert tracking.version_by_alias(root, STUDENT, tracking.CHAMPION) == 2
    tracking.tag_version(root, STUDENT, 2, {"ms2rgb.promoted": "true", "ms2rgb.test_accuracy": "0.5"})
    tags = MlflowClient().get_model_version(STUDENT, "2").tags
    assert tags["ms2rgb.promoted"] == "true" and tags["ms2rgb.test_accuracy"] == "0.5"
    with pytest.raises(Ms2rgbError, match="could not be set"):
        tracking.set_alias(root, STUDENT, tracking.CHAMPION, 9)


def test_torch_models_get_the_challenger_alias_too(tmp_path: Path) -> None:
    model = SceneCNN(SceneCNNConfig(bands=RGB_BANDS, n_classes=3, width=4, from_8bit=True))
    with tracking.stage_run(tmp_path, "ms2rgb", "teacher") as tracker:
        version = tracker.log_torch_model(model, _tiles(2), "test-teacher")
    assert version == 1 and tracking.version_by_alias(tmp_path, "test-teacher", tracking.CHALLENGER) == 1
    loaded = tracking.load_registered_module(tmp_path, "models:/test-teacher@challenger")
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(_tiles(2))), model.eval()(torch.from_numpy(_tiles(2))))


def test_the_registry_holds_weight_files_a_signature_and_an_example(registry: Path, tmp_path: Path) -> None:
    import mlflow.artifacts
    import mlflow.models

    tracking.configure(registry, "ms2rgb")
    info = mlflow.models.get_model_info(f"models:/{STUDENT}@champion")
    assert set(info.flavors) == {"python_function"}
    (tensor_in,), (tensor_out,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (tensor_in.type, tensor_in.shape) == (np.dtype(np.float32), (-1, 3, 64, 64))
    assert (tensor_out.type, tensor_out.shape) == (np.dtype(np.float32), (-1, 4))
    detector = mlflow.models.get_model_info(f"models:/{DETECTOR}@champion")
    assert detector.signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert detector.signature.outputs.inputs[0].shape == (-1, -1, -1)
    assert detector.metadata == {"class_names": list(SURFACE_NAMES)}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{DETECTOR}/1", dst_path=str(tmp_path)))
    assert {p.name for p in (local / "artifacts").iterdir()} == {"detector.pt", "backbone.pt"}
    # Models from code: the model is model_code.py naming its class; nothing is pickled.
    assert not list(local.glob("*.pkl")) and (local / "model_code.py").is_file()
    assert (info.saved_input_example_info or {}).get("serving_input_path")


def test_load_registered_module_rebuilds_the_torch_modules(registry: Path) -> None:
    student = tracking.load_registered_module(registry, f"models:/{STUDENT}@champion")
    assert isinstance(student, SceneCNN) and not student.training
    detector = tracking.load_registered_module(registry, f"models:/{DETECTOR}/1")
    assert isinstance(detector, ClassMapDetector) and detector.class_names == list(SURFACE_NAMES)
    with torch.no_grad():
        logits = detector(torch.from_numpy(_tiles(2, 32)))
    assert logits.shape == (2, len(SURFACE_NAMES), 32, 32)
    assert tracking.load_torch_model(registry, f"models:/{DETECTOR}/1").class_names == list(SURFACE_NAMES)
    with pytest.raises(Ms2rgbError, match="could not be loaded"):
        tracking.load_registered_module(registry, f"models:/{STUDENT}/7")


def test_reading_the_registry_creates_no_store(tmp_path: Path) -> None:
    with pytest.raises(Ms2rgbError, match="no MLflow store in this project"):
        tracking.load_registered_module(tmp_path, f"models:/{STUDENT}@champion")
    with pytest.raises(Ms2rgbError, match="no MLflow store in this project"):
        tracking.set_alias(tmp_path, STUDENT, tracking.CHAMPION, 1)
    with pytest.raises(Ms2rgbError, match="no MLflow store in this project"):
        tracking.tag_version(tmp_path, STUDENT, 1, {"a": "b"})
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


# ------------------------------------------------------------------------------------ the scoring server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return int(response.status)


def _post(url: str, payload: dict, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture
def serve(registry: Path, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """serve(uri) -> base URL of `mlflow models serve -m uri --env-manager local`; stopped after the test."""
    servers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(uri: str) -> str:
        port, log = _free_port(), tmp_path / f"server{len(servers)}.log"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{registry / 'mlflow.db'}",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        command = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [*command, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        servers.append((proc, log))
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the scoring server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if _get(f"{base}/ping", timeout=2) == 200:
                    return base
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        pytest.fail(f"the scoring server did not answer /ping within 120 s:\n{log.read_text()[-3000:]}")

    yield start
    for proc, _ in servers:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.mark.slow
def test_served_student_answers_like_the_model_in_process(registry: Path, serve: Callable[[str], str]) -> None:
    import mlflow.pyfunc

    tracking.configure(registry, "ms2rgb")
    uri = f"models:/{STUDENT}@champion"
    tiles = _tiles(3, seed=5)
    answer = _post(f"{serve(uri)}/invocations", {"inputs": tiles.tolist()})
    served = np.asarray(answer["predictions"], dtype=np.float32)
    local = mlflow.pyfunc.load_model(uri).predict(tiles)
    assert served.shape == (3, 4) and np.allclose(served.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(served, local, atol=1e-5)
    with torch.no_grad():
        module = tracking.load_registered_module(registry, uri)
        assert np.allclose(served, module(torch.from_numpy(tiles)).softmax(dim=1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_served_detector_answers_class_ids_like_the_model_in_process(
    registry: Path, serve: Callable[[str], str]
) -> None:
    import mlflow.pyfunc

    tracking.configure(registry, "ms2rgb")
    uri = f"models:/{DETECTOR}@champion"
    tiles = _tiles(2, size=32, seed=6)  # any size: the signature leaves H and W free
    answer = _post(f"{serve(uri)}/invocations", {"inputs": tiles.tolist()})
    served = np.asarray(answer["predictions"])
    local = mlflow.pyfunc.load_model(uri).predict(tiles)
    assert served.shape == (2, 32, 32) and np.issubdtype(served.dtype, np.integer)
    assert np.allclose(served, local) and served.max() < len(SURFACE_NAMES)
