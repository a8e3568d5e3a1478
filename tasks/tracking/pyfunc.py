"""Registered models as MLflow pyfunc models: weight files as artifacts, rebuilt on load.

The registry keeps the stage's own weight files (the ``model.pt`` of
``tasks/training/store.py``; the detector's ``detector.pt`` and, for the fallback backbone,
``backbone.pt``), not pickled Python objects. The model's code is ``model_code.py`` (MLflow's
models from code): it picks one of the PythonModel classes here by the logged model_config, and
that class rebuilds the torch module from the files in ``load_context``. So a registered version
loads and serves wherever the ``ms2rgb`` package imports (``mlflow models serve --env-manager
local`` from the project's venv), and ``load_registered_module`` hands the same module to code
that wants torch.

Serving contract (the signature says the same):

- input: one float32 tensor (N, C, H, W) of raw tile values as stored; for the student and the
  detector that is 8-bit RGB, 0..255 (the models scale it themselves). JSON:
  ``{"inputs": [[[[r, ...], ...], [[g, ...]], [[b, ...]]], ...]}``.
- student (``SceneClassifierPyfunc``): (N, n_classes) float32 softmax probabilities over the
  scene classes, in the order of the model version's ``class_names`` metadata.
- detector (``LandCoverPyfunc``): (N, H, W) int64 surface-class ids per pixel (the arg-max of the
  fused logits), indices into ``class_names``. Ids rather than logits keep a 64x64 tile's answer
  at 4096 integers instead of K x 4096 floats; code that needs the logits loads the module.

The scoring server answers ``{"predictions": <that array as nested lists>}``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from torch import nn

# Artifact names, as the `artifacts` mapping of log_model and PythonModelContext.artifacts spell them.
MODEL_ARTIFACT = "model"  # a tasks/training/store.py model file
DETECTOR_ARTIFACT = "detector"  # artifacts/detector/detector.pt
BACKBONE_ARTIFACT = "backbone"  # the CLIP weights detector.pt names, when they are a local file


class TorchPyfunc(PythonModel):
    """A torch module behind the pyfunc interface: built from artifact files, run on CPU in batches.

    Subclasses say how to build the module (`build`) and what a batch's answer is (`answer`).
    They are logged as code (model_code.py), never pickled; `module` exists after `load_context`.
    """

    batch_size = 64

    def __init__(self) -> None:
        self._module: nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_module"] = None  # weights travel as artifacts, never inside the pickle
        return state

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            raise RuntimeError(f"{type(self).__name__}: call load_context (or load the model through MLflow) first")
        return self._module

    def build(self, artifacts: dict[str, Path]) -> nn.Module:
        raise NotImplementedError

    def answer(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_context(self, context: PythonModelContext) -> None:
        self._module = self.build({key: Path(path) for key, path in context.artifacts.items()}).to("cpu").eval()

    def loaded(self, artifacts: dict[str, Path]) -> TorchPyfunc:
        """A copy of this model loaded from local files, as MLflow would load it from the registry."""
        clone = copy.copy(self)
        clone.load_context(PythonModelContext({k: str(v) for k, v in artifacts.items()}, {}))
        return clone

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"expected a float32 array (N, C, H, W) with N >= 1, got shape {images.shape}")
        module, step = self.module, self.batch_size
        with torch.inference_mode():
            parts = [
                self.answer(module, torch.from_numpy(np.ascontiguousarray(images[i : i + step])))
                for i in range(0, len(images), step)
            ]
        return torch.cat(parts).numpy()


class SceneClassifierPyfunc(TorchPyfunc):
    """A SceneCNN saved by tasks/training/store.py (``model.pt``): tiles -> softmax probabilities (N, K)."""

    def build(self, artifacts: dict[str, Path]) -> nn.Module:
        # Read like tasks/training/store.py:load_model, without importing the training layer: what
        # tracking imports, every stage's DVC deps must cover (tests/test_layout.py).
        from ms2rgb.models.classifier import SceneCNN, SceneCNNConfig

        path = artifacts[MODEL_ARTIFACT]
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("kind") != "scene_cnn":
            raise ValueError(f"{path} holds a {payload.get('kind')!r} model, expected 'scene_cnn'")
        config: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}
        model = SceneCNN(SceneCNNConfig(**config))
        model.load_state_dict(payload["state_dict"])
        return model

    def answer(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return module(images).softmax(dim=1).float()


class LandCoverPyfunc(TorchPyfunc):
    """The tuned detector (``detector.pt`` + its CLIP weights): RGB tiles -> class ids per pixel (N, H, W)."""

    batch_size = 8  # CLIP tiles are resized to the CLIP's own size (224 px for ViT-B-32)

    def build(self, artifacts: dict[str, Path]) -> nn.Module:
        from ms2rgb.models.clip_backbone import load_clip
        from ms2rgb.models.clip_detector import detector_from_payload
        from ms2rgb.tasks.data.pixel_size import recorded_pixel_size

        path = artifacts[DETECTOR_ARTIFACT]
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone = artifacts.get(BACKBONE_ARTIFACT)
        # Without a weight file the detector.pt names an open_clip pretrained tag, which open_clip fetches.
        clip, tokenizer, _ = load_clip(state["clip_model"], str(backbone) if backbone else state["clip_pretrained"])
        try:
            return detector_from_payload(state, clip, tokenizer, recorded_pixel_size(state))
        except ValueError as err:
            raise ValueError(f"{path} {err}") from err

    def answer(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return module(images).argmax(dim=1)


def detector_artifacts(detector_file: Path, root: Path) -> dict[str, Path]:
    """The files a registered detector needs: detector.pt, and the CLIP weights it names when they are a file.

    The fallback backbone lies beside detector.pt (``pretrained_in_artifacts``); weights given in
    params as a path are resolved against the project root, as the stage resolved them.
    """
    state = torch.load(detector_file, map_location="cpu", weights_only=True)
    artifacts = {DETECTOR_ARTIFACT: detector_file}
    pretrained = state["clip_pretrained"]
    if state["pretrained_in_artifacts"]:
        artifacts[BACKBONE_ARTIFACT] = detector_file.parent / pretrained
    elif pretrained:
        for candidate in (root / pretrained, Path(pretrained)):  # an absolute path stays itself
            if candidate.is_file():
                artifacts[BACKBONE_ARTIFACT] = candidate
                break
    return artifacts


# The classes tasks/tracking/model_code.py may instantiate, by the name model_config gives.
PYFUNCS: dict[str, type[TorchPyfunc]] = {cls.__name__: cls for cls in (SceneClassifierPyfunc, LandCoverPyfunc)}
MODEL_CODE = Path(__file__).with_name("model_code.py")
