"""A user's own masks, first try, on real imagery: the committed Dubai aerial sample (tests/data/aerial_sample,
CC0) goes through `ms2rgb data masks`, prepare and validate as a user would run them, and the detector
trains on its five classes. What the method scores there against the forest and the U-Net is in the README."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_project

from ms2rgb.flows.cli import main as cli_main
from ms2rgb.flows.stages import run_stage
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, read_manifest
from ms2rgb.tasks.data.sources.mask_folder import IMPORT_DIR
from ms2rgb.tasks.detection.model import DETECTOR_FILE

SAMPLE = REPO / "tests" / "data" / "aerial_sample"
CLASSES = ["building", "land", "road", "vegetation", "water"]
IMAGES = 27


def test_the_sample_holds_the_published_bytes() -> None:
    """Re-encoding a JPEG or a palette PNG would change the pixels the README's figures were measured on."""
    for line in (SAMPLE / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name
    assert len(list((SAMPLE / "images").glob("*.jpg"))) == IMAGES


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project with the sample imported by the command line and `source: folder` set."""
    root = make_project(tmp_path_factory.mktemp("aerial") / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["segmentation"]["source"] = "folder"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    inputs = [
        "--images",
        str(SAMPLE / "images"),
        "--masks",
        str(SAMPLE / "masks"),
        "--legend",
        str(SAMPLE / "legend.yaml"),
    ]
    cli_main(["--root", str(root), "data", "masks", *inputs])
    return root


def test_every_image_is_tiled_with_the_legend_classes(imported: Path) -> None:
    out = imported / "data" / "masks" / IMPORT_DIR
    manifest = read_manifest(out / MANIFEST_NAME)
    assert manifest["location_id"].nunique() == IMAGES
    # 64-px tiles of 510..797-px images: at least 7 x 8 whole tiles each
    assert len(manifest) >= IMAGES * 7 * 8
    assert list(read_legend(out)) == CLASSES


def test_an_import_that_succeeds_leads_to_a_run_that_validates(imported: Path) -> None:
    assert (imported / "data/masks/README.md").is_file()  # the committed file prepare's DVC dep needs stays
    assert run_stage("prepare", imported)["segmentation_source"] == "folder"
    legend = yaml.safe_load((SAMPLE / "legend.yaml").read_text())["classes"]
    assert read_legend(imported / "data" / "prepared") == {name: c["description"] for name, c in legend.items()}
    assert run_stage("validate", imported)["passed"]


@pytest.mark.slow
def test_the_detector_and_its_baselines_map_the_five_surfaces(imported: Path) -> None:
    params = yaml.safe_load((imported / "params.yaml").read_text())
    baselines = ["linear_probe", "pixel_forest", "unet", "pixel_mlp"]  # the stage's own tests see the full grid
    params["profiles"]["tiny"]["detector"].update(grid="reduced", grids={"reduced": baselines}, seeds=1)
    (imported / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage("prepare", imported)
    report = run_stage("detector", imported)
    assert set(report["per_class_iou"]) == set(CLASSES)
    assert {"pixel_forest", "unet", "linear_probe", "pixel_mlp"} <= set(report["baselines"])
    saved = torch.load(imported / "artifacts" / "detector" / DETECTOR_FILE, weights_only=False)
    assert saved["class_names"] == CLASSES
    assert saved["pixel_size_m"] is None  # JPEGs without a geotransform: detect skips the pixel-size check
