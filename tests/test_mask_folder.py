"""The `folder` segmentation source (`ms2rgb data masks`): real image and mask files in every format it
takes, tiles that keep the labels, splits by image, the legend as the detector's class set, validation,
and one clear error per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely.geometry
import yaml
from conftest import REPO
from helpers_params import config, repo_params
from helpers_rasters import CRS, TRANSFORM, smooth_rgb, write_raster
from PIL import Image as PILImage

from ms2rgb.flows.cli import main as cli_main
from ms2rgb.tasks.data.classes import MASK_NODATA
from ms2rgb.tasks.data.legend import read_legend
from ms2rgb.tasks.data.manifest import MANIFEST_NAME, SEGMENTATION_SPLITS, SOURCE_FILE, read_manifest
from ms2rgb.tasks.data.sources.mask_folder import IMPORT_DIR, build_folder_segmentation, image_splits, import_masks
from ms2rgb.tasks.detection.captions import captions
from ms2rgb.tasks.errors import DataError, Ms2rgbError, ParamsError
from ms2rgb.tasks.validate import validate_dataset

WATER, FOREST = 0, 1  # legend order = mask values written
LIMIT = config("validate").max_ignore_share  # what `ms2rgb data masks` passes: the params' own limit
LEGEND = {
    "attribute": "landcover",
    "ignore": [255, "#000000"],
    "classes": {
        "water": {"description": "open water of a lake", "id": 1, "colour": "#0000ff", "value": "Water"},
        "forest": {"description": "dense tree canopy", "id": 2, "colour": [0, 128, 0], "value": "Forest"},
    },
}


def write_legend_yaml(path: Path, legend: dict = LEGEND) -> Path:
    path.write_text(yaml.safe_dump(legend, sort_keys=False))
    return path


def id_mask(height: int, width: int) -> np.ndarray:
    """(H, W) uint8 input ids: water on top, forest below, an ignored stripe on the left."""
    ids = np.full((height, width), 2, np.uint8)
    ids[: height // 2] = 1
    ids[:, :4] = 255
    return ids


def colour_mask(ids: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the legend colours of `id_mask`, black for ignored."""
    table = {1: (0, 0, 255), 2: (0, 128, 0), 255: (0, 0, 0)}
    return np.stack([np.vectorize(lambda v, c=c: table[v][c])(ids) for c in range(3)], axis=-1).astype(np.uint8)


def expected(ids: np.ndarray) -> np.ndarray:
    return np.select([ids == 1, ids == 2], [WATER, FOREST], MASK_NODATA).astype(np.uint8)


def square_polygon(left: float, top: float, size: float) -> dict:
    ring = [[left, top], [left + size, top], [left + size, top - size], [left, top - size], [left, top]]
    return {"type": "Polygon", "coordinates": [ring]}


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Four images, one per input kind: GeoTIFF + id GeoTIFF (CRS), PNG + colour PNG, JPEG (no CRS) +
    id PNG, GeoTIFF + GeoJSON polygons."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    write_raster(images / "a.tif", smooth_rgb(128, 128, seed=1))
    write_raster(masks / "a.tif", id_mask(128, 128)[None])
    PILImage.fromarray(smooth_rgb(64, 128, seed=2).transpose(1, 2, 0)).save(images / "b.png")
    PILImage.fromarray(colour_mask(id_mask(64, 128))).save(masks / "b.png")
    PILImage.fromarray(smooth_rgb(128, 64, seed=3).transpose(1, 2, 0)).save(images / "c.jpg", quality=95)
    PILImage.fromarray(id_mask(128, 64), mode="L").save(masks / "c.png")
    write_raster(images / "d.tif", smooth_rgb(64, 128, seed=4))
    left, top = TRANSFORM.c, TRANSFORM.f  # 10 m pixels: the left tile (640 m) water, a forest square right
    features = [
        {"type": "Feature", "properties": {"landcover": "Water"}, "geometry": square_polygon(left, top, 640)},
        {"type": "Feature", "properties": {"landcover": "Forest"}, "geometry": square_polygon(left + 640, top, 320)},
    ]
    crs_member = {"type": "name", "properties": {"name": CRS}}
    (masks / "d.geojson").write_text(json.dumps({"type": "FeatureCollection", "crs": crs_member, "features": features}))
    return images, masks, write_legend_yaml(tmp_path / "legend.yaml")


def tile(out: Path, frame: pd.DataFrame, name: str, column: str = "mask_path") -> np.ndarray:
    """A tile of the import into the masks folder `out`."""
    row = frame[frame["id"] == f"folder:{name}-rgb"].iloc[0]
    with rasterio.open(out / IMPORT_DIR / row[column]) as src:
        return src.read()


def test_every_input_kind_becomes_tiles_that_keep_image_and_labels(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    out = tmp_path / "out"
    frame = import_masks(images, masks, legend, out, max_ignore_share=LIMIT, progress=lambda _: None).manifest
    ids = id_mask(128, 128)
    assert np.array_equal(tile(out, frame, "a-r001c000")[0], expected(ids[64:, :64]))  # id GeoTIFF
    with rasterio.open(images / "a.tif") as src:
        assert np.array_equal(tile(out, frame, "a-r001c000", "path"), src.read()[:, 64:, :64])
    assert np.array_equal(tile(out, frame, "b-r000c001")[0], expected(id_mask(64, 128)[:, 64:]))  # colour PNG
    assert np.array_equal(tile(out, frame, "c-r001c000")[0], expected(id_mask(128, 64)[64:]))  # JPEG, id PNG
    with rasterio.open(out / IMPORT_DIR / frame[frame["source"] == "folder:c"]["path"].iloc[0]) as src:
        assert src.crs.to_wkt().startswith("LOCAL_CS")  # no CRS: its pixel grid, not a made-up place
    with rasterio.open(out / IMPORT_DIR / frame[frame["source"] == "folder:a"]["path"].iloc[0]) as src:
        assert src.crs.to_string() == CRS
    # The GeoJSON, rasterized on d.tif's grid: the water square fills the left tile, the 32-px forest
    # square the top-left quarter of the right tile, the rest of that tile has no label.
    assert (tile(out, frame, "d-r000c000")[0] == WATER).all()
    right = tile(out, frame, "d-r000c001")[0]
    assert (right[:32, :32] == FOREST).all() and (right[32:] == MASK_NODATA).all() and (right[:, 32:] == 255).all()
    assert len(frame) == 4 + 2 + 2 + 2 and frame["split"].isna().all()
    assert read_legend(out / IMPORT_DIR) == {"water": "open water of a lake", "forest": "dense tree canopy"}


def test_tiles_are_split_by_image_and_the_legend_becomes_the_detector_class_set(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    seg = tmp_path / "seg"
    import_masks(images, masks, legend, tmp_path / "data_masks", max_ignore_share=LIMIT, progress=lambda _: None)
    shares = config("data.segmentation").shares
    frame = build_folder_segmentation(tmp_path, "data_masks", seg, shares, seed=0, progress=lambda _: None)
    assert set(frame["split"]) == set(SEGMENTATION_SPLITS)
    assert (frame.groupby("source")["split"].nunique() == 1).all()  # every tile of an image in one split
    assert (frame.groupby("source")["location_id"].nunique() == 1).all()
    assert read_manifest(seg / MANIFEST_NAME)["split"].equals(frame["split"])
    assert all((seg / p).is_file() for p in frame["mask_path"])
    # What the detector stage reads (read_legend of the prepared folder, a copy of this one): the
    # user's classes, in mask-value order, whose descriptions the pretraining captions quote.
    classes = read_legend(seg)
    assert list(classes) == ["water", "forest"]
    mask = np.full((4, 4), WATER, np.uint8)
    assert captions(np.array([-1]), mask[None], classes) == ["a satellite image with mostly open water of a lake"]


def test_image_splits_fill_every_split_by_the_shares_and_follow_the_seed() -> None:
    shares = {"captions": 0.4, "fewshot": 0.3, "seg_test": 0.3}
    split = image_splits([f"img{i}" for i in range(10)], shares, "0:folder")
    assert pd.Series(split).value_counts().to_dict() == {"captions": 4, "fewshot": 3, "seg_test": 3}
    assert image_splits([f"img{i}" for i in range(10)], shares, "0:folder") == split
    assert set(image_splits(["a", "b", "c"], shares, "1:folder").values()) == set(shares)
    with pytest.raises(Ms2rgbError, match="2 image"):
        image_splits(["a", "b"], shares, "0:folder")


def test_segmentation_source_is_checked_and_folder_is_accepted() -> None:
    assert repo_params(data__segmentation__source="folder").data.segmentation.folder == "data/masks"
    with pytest.raises(ParamsError) as err:
        repo_params(data__segmentation__source="hand")
    message = str(err.value)
    assert "data.segmentation.source='hand'" in message and all(s in message for s in ("synth", "folder", "scenes"))
    assert "\n" not in message


def test_validation_names_a_mask_tile_with_too_many_ignored_pixels(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    seg = tmp_path / "seg"
    import_masks(images, masks, legend, tmp_path / "data_masks", max_ignore_share=LIMIT, progress=lambda _: None)
    shares = config("data.segmentation").shares
    build_folder_segmentation(tmp_path, "data_masks", seg, shares, seed=0, progress=lambda _: None)
    cfg = config("validate", max_ignore_share=0.5)  # d's right tile is 75 % unlabelled
    outcome = validate_dataset(seg / MANIFEST_NAME, seg, tmp_path / "val", cfg, progress=lambda _: None)
    failed = [f for f in outcome.failed if f["batch"] == "masks"]
    assert [f["column"] for f in failed] == ["ignore_limit/ignore_share"]
    assert failed[0]["files"] == ["mask/d/d-r000c001.tif"] and failed[0]["offending"] == ["folder:d-r000c001-rgb"]
    assert not [f for f in outcome.failed if f["batch"] == "tiles"]  # sizes, CRS (LOCAL_CS too), bands all fine
    # A mask value beyond the legend (a hand-edited tile) is named too.
    path = seg / "mask" / "a" / "a-r000c000.tif"
    with rasterio.open(path, "r+") as dst:
        dst.write(np.full((1, 64, 64), 7, np.uint8))
    outcome = validate_dataset(seg / MANIFEST_NAME, seg, tmp_path / "val2", cfg, progress=lambda _: None)
    failed = {f["column"]: f for f in outcome.failed if f["batch"] == "masks"}
    assert failed["class_limit/mask_max"]["files"] == ["mask/a/a-r000c000.tif"]


# ---------------------------------------------------------------- import and validation agree


def mostly_unlabelled_image(images: Path, masks: Path) -> None:
    """e.tif, three tiles side by side: fully labelled, 95 % unlabelled, unlabelled."""
    write_raster(images / "e.tif", smooth_rgb(64, 192, seed=5))
    ids = np.full((64, 192), 255, np.uint8)
    ids[:, :64] = 1
    ids[:16, 64:77] = 2  # 208 of 4096 pixels: 94.9 % unlabelled
    write_raster(masks / "e.tif", ids[None])


def test_tiles_validation_would_fail_are_left_out_counted_and_the_run_validates(
    inputs: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tried as a new user: an import with mostly unlabelled tiles succeeds, says what it left out,
    and validate (the params' own limit) passes on what it wrote."""
    images, masks, legend = inputs
    mostly_unlabelled_image(images, masks)
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    argv = ["--root", str(root), "data", "masks", "--images", str(images), "--masks", str(masks)]
    assert cli_main([*argv, "--legend", str(legend)]) == 0
    out = capsys.readouterr().out
    assert "masks: e.tif + e.tif: 1 tiles (left out: 1 without label, 1 more than 90 % unlabelled" in out
    assert "11 tiles of 5 images written" in out
    assert "tiles left out: 1 without label, 1 more than 90 % unlabelled (validate.max_ignore_share)" in out
    imported = root / "data/masks" / IMPORT_DIR
    assert json.loads((imported / SOURCE_FILE).read_text())["left_out"] == {"unlabelled": 1, "mostly_unlabelled": 1}
    assert json.loads((imported / SOURCE_FILE).read_text())["max_ignore_share"] == LIMIT
    frame = read_manifest(imported / MANIFEST_NAME)
    assert set(frame[frame["source"] == "folder:e"]["id"]) == {"folder:e-r000c000-rgb"}
    seg = tmp_path / "seg"
    build_folder_segmentation(root, "data/masks", seg, config("data.segmentation").shares, 0, lambda _: None)
    # The params' validate section as is, but for the splits this manifest alone can have (in a run it
    # is merged with the MS source's, which brings ms_train and test).
    cfg = config("validate", required_splits=list(SEGMENTATION_SPLITS))
    outcome = validate_dataset(seg / MANIFEST_NAME, seg, tmp_path / "val", cfg, lambda _: None)
    assert cfg.max_ignore_share == LIMIT and outcome.passed, outcome.failed


@pytest.mark.parametrize("limit, kept", [(0.75, True), (0.74, False)])
def test_import_keeps_exactly_what_validation_accepts_at_the_limit(
    inputs: tuple, tmp_path: Path, limit: float, kept: bool
) -> None:
    """d's right tile is exactly 75 % unlabelled: validation passes it at 0.75, so the import keeps it."""
    images, masks, legend = inputs
    done = import_masks(images, masks, legend, tmp_path / "data_masks", max_ignore_share=limit, progress=lambda _: None)
    assert ("folder:d-r000c001-rgb" in set(done.manifest["id"])) is kept
    assert done.left_out.mostly_unlabelled == (0 if kept else 1) and done.left_out.unlabelled == 0
    seg = tmp_path / "seg"
    build_folder_segmentation(tmp_path, "data_masks", seg, config("data.segmentation").shares, 0, lambda _: None)
    cfg = config("validate", max_ignore_share=limit)
    outcome = validate_dataset(seg / MANIFEST_NAME, seg, tmp_path / "val", cfg, progress=lambda _: None)
    assert not [f for f in outcome.failed if f["batch"] == "masks"]


def test_an_import_that_keeps_no_tile_names_the_counts_and_the_limit(inputs: tuple, tmp_path: Path) -> None:
    images, masks = tmp_path / "only_e" / "images", tmp_path / "only_e" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    mostly_unlabelled_image(images, masks)
    with rasterio.open(masks / "e.tif", "r+") as dst:  # its labelled tile unlabelled too
        dst.write(np.full((1, 64, 64), 255, np.uint8), window=rasterio.windows.Window(0, 0, 64, 64))
    with pytest.raises(Ms2rgbError) as err:
        import_masks(images, masks, inputs[2], tmp_path / "out", max_ignore_share=LIMIT, progress=lambda _: None)
    message = str(err.value)
    assert "no tile is labelled enough to keep (left out: 2 without label, 1 more than 90 % unlabelled" in message
    assert "raise validate.max_ignore_share" in message and "\n" not in message


# ---------------------------------------------------------------- one clear error per bad input


def _fails(inputs: tuple, tmp_path: Path, *named: str) -> str:
    images, masks, legend = inputs
    with pytest.raises(Ms2rgbError) as err:
        import_masks(images, masks, legend, tmp_path / "out", max_ignore_share=LIMIT, progress=lambda _: None)
    message = str(err.value)
    assert "\n" not in message and "Fix:" in message
    for part in named:
        assert part in message, (part, message)
    assert not [p.name for p in (tmp_path / "out").glob(f"{IMPORT_DIR}*")]  # nothing half-written
    return message


def test_a_mask_of_another_size_names_both_files_and_sizes(inputs: tuple, tmp_path: Path) -> None:
    write_raster(inputs[1] / "a.tif", id_mask(64, 128)[None])
    _fails(inputs, tmp_path, "a.tif", "128x64 px", "128x128 px")


def test_a_colour_not_in_the_legend_is_named(inputs: tuple, tmp_path: Path) -> None:
    rgb = colour_mask(id_mask(64, 128))
    rgb[10, 20] = (255, 0, 255)
    PILImage.fromarray(rgb).save(inputs[1] / "b.png")
    _fails(inputs, tmp_path, "b.png", "colour #ff00ff", "row 10, col 20", "legend.yaml")


def test_an_id_not_in_the_legend_is_named(inputs: tuple, tmp_path: Path) -> None:
    ids = id_mask(128, 128)
    ids[5, 6] = 9
    write_raster(inputs[1] / "a.tif", ids[None])
    _fails(inputs, tmp_path, "a.tif", "id 9", "`id: 9`")


def test_an_empty_legend_is_refused(inputs: tuple, tmp_path: Path) -> None:
    write_legend_yaml(inputs[2], {"classes": {}})
    _fails(inputs, tmp_path, "legend.yaml", "empty")


def test_an_image_without_mask_is_named(inputs: tuple, tmp_path: Path) -> None:
    write_raster(inputs[0] / "e.tif", smooth_rgb(64, 64))
    _fails(inputs, tmp_path, "e.tif", "image without mask", "same file stem")


def test_an_unknown_vector_attribute_value_is_named(inputs: tuple, tmp_path: Path) -> None:
    path = inputs[1] / "d.geojson"
    data = json.loads(path.read_text())
    data["features"][1]["properties"]["landcover"] = "Marsh"
    path.write_text(json.dumps(data))
    _fails(inputs, tmp_path, "d.geojson", "landcover='Marsh'", "value: Marsh")


def test_geopackage_labels_rasterize_like_the_same_polygons_in_geojson(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    from_json = import_masks(
        images, masks, legend, tmp_path / "json", max_ignore_share=LIMIT, progress=lambda _: None
    ).manifest
    # The same two polygons as a GeoPackage, the way labelling tools export it (WKB geometries, one layer).
    collection = json.loads((masks / "d.geojson").read_text())
    (masks / "d.geojson").unlink()
    pyogrio.raw.write(
        masks / "d.gpkg",
        np.array([shapely.geometry.shape(f["geometry"]).wkb for f in collection["features"]], dtype=object),
        [np.array([f["properties"]["landcover"] for f in collection["features"]], dtype=object)],
        ["landcover"],
        driver="GPKG",
        geometry_type="Polygon",
        crs=CRS,
    )
    from_gpkg = import_masks(
        images, masks, legend, tmp_path / "gpkg", max_ignore_share=LIMIT, progress=lambda _: None
    ).manifest
    for name in ("d-r000c000", "d-r000c001"):
        assert np.array_equal(tile(tmp_path / "gpkg", from_gpkg, name), tile(tmp_path / "json", from_json, name))
    assert (tile(tmp_path / "gpkg", from_gpkg, "d-r000c000")[0] == WATER).all()


def test_a_broken_geopackage_is_named(inputs: tuple, tmp_path: Path) -> None:
    (inputs[1] / "d.geojson").unlink()
    (inputs[1] / "d.gpkg").write_bytes(b"not a database")
    _fails(inputs, tmp_path, "d.gpkg", "is not a GeoPackage")


def test_an_id_of_true_and_two_classes_of_one_vector_value_are_refused(inputs: tuple, tmp_path: Path) -> None:
    classes = {"water": {"id": True}, "forest": {"id": 2}}  # YAML `true` is a bool, not the id 1
    write_legend_yaml(inputs[2], {"classes": classes})
    _fails(inputs, tmp_path, "legend.yaml", "class 'water' id True")
    classes = {"water": {"id": 1, "value": "Forest"}, "forest": {"id": 2}}  # forest's value: its name, "forest"
    write_legend_yaml(inputs[2], {"classes": {**classes, "Forest": {"id": 3}}})
    _fails(inputs, tmp_path, "legend.yaml", "'water' and 'Forest' share the vector value 'Forest'", "own `value`")


# ---------------------------------------------------------------- alpha bands


def test_transparent_pixels_are_unlabelled_whatever_their_colour_in_mask_or_image(
    inputs: tuple, tmp_path: Path
) -> None:
    images, masks, legend = inputs
    rgba = np.dstack([colour_mask(id_mask(64, 128)), np.full((64, 128), 255, np.uint8)])
    rgba[:, 100:] = (255, 0, 255, 0)  # an unknown colour, but fully transparent: no label, no error
    PILImage.fromarray(rgba, mode="RGBA").save(masks / "b.png")
    image = np.dstack([smooth_rgb(64, 128, seed=2).transpose(1, 2, 0), np.full((64, 128), 255, np.uint8)])
    image[:, 64:80, 3] = 0  # the image itself has nothing there
    PILImage.fromarray(image, mode="RGBA").save(images / "b.png")
    out = tmp_path / "out"
    frame = import_masks(images, masks, legend, out, max_ignore_share=LIMIT, progress=lambda _: None).manifest
    right = tile(out, frame, "b-r000c001")[0]
    want = expected(id_mask(64, 128)[:, 64:])
    want[:, :16] = want[:, 36:] = MASK_NODATA  # the image's transparent columns, then the mask's
    assert np.array_equal(right, want)


# ---------------------------------------------------------------- what the command may replace


def test_only_the_import_subfolder_is_replaced_and_the_committed_readme_stays(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    folder = tmp_path / "data_masks"
    folder.mkdir()
    (folder / "README.md").write_text("committed\n")
    import_masks(images, masks, legend, folder, max_ignore_share=LIMIT, progress=lambda _: None)
    first = read_manifest(folder / IMPORT_DIR / MANIFEST_NAME)
    import_masks(
        images, masks, legend, folder, max_ignore_share=LIMIT, progress=lambda _: None
    )  # an earlier import is replaced
    assert (folder / "README.md").read_text() == "committed\n"
    assert read_manifest(folder / IMPORT_DIR / MANIFEST_NAME).equals(first)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", IMPORT_DIR]


def test_inputs_inside_the_import_folder_are_refused_and_kept(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    folder = tmp_path / "data_masks"
    inside = folder / IMPORT_DIR / "legend.yaml"
    inside.parent.mkdir(parents=True)
    inside.write_text(legend.read_text())
    with pytest.raises(Ms2rgbError) as err:
        import_masks(images, masks, inside, folder, max_ignore_share=LIMIT, progress=lambda _: None)
    message = str(err.value)
    assert "--legend lies inside" in message and str(folder / IMPORT_DIR) in message and "Fix:" in message
    assert "\n" not in message and inside.read_text() == legend.read_text()


def test_a_folder_that_no_import_wrote_is_refused_not_deleted(inputs: tuple, tmp_path: Path) -> None:
    images, masks, legend = inputs
    target = tmp_path / "data_masks" / IMPORT_DIR
    target.mkdir(parents=True)
    (target / "thesis.docx").write_text("months of work")
    with pytest.raises(Ms2rgbError, match=f"holds no {SOURCE_FILE} of an earlier `ms2rgb data masks`.*Fix:"):
        import_masks(images, masks, legend, tmp_path / "data_masks", max_ignore_share=LIMIT, progress=lambda _: None)
    assert (target / "thesis.docx").read_text() == "months of work"


def test_written_sources_name_no_machine_path_so_two_clones_hash_alike(inputs: tuple, tmp_path: Path) -> None:
    written = []
    for clone in ("clone_a", "somewhere/else/clone_b"):
        root = tmp_path / clone
        for folder in inputs:
            (shutil.copytree if folder.is_dir() else shutil.copy)(folder, root / "in" / folder.name)
        args = [root / "in" / p.name for p in inputs]
        import_masks(*args, root / "data" / "masks", max_ignore_share=LIMIT, progress=lambda _: None)
        seg = root / "data" / "segmentation"
        build_folder_segmentation(root, "data/masks", seg, config("data.segmentation").shares, 0, lambda _: None)
        written.append(
            ((root / "data/masks" / IMPORT_DIR / SOURCE_FILE).read_bytes(), (seg / SOURCE_FILE).read_bytes())
        )
    assert written[0] == written[1]
    imported, segmentation = (json.loads(b) for b in written[0])
    assert str(tmp_path) not in written[0][0].decode() + written[0][1].decode()
    assert imported["legend"] == "legend.yaml" and ["a.tif", "a.tif"] in imported["pairs"]
    assert segmentation == {"source": "folder", "folder": "data/masks"}


def test_prepare_without_an_import_says_to_run_the_command(tmp_path: Path) -> None:
    with pytest.raises(Ms2rgbError, match=rf"data/masks/{IMPORT_DIR}: .* no masks were imported.*`ms2rgb data masks"):
        build_folder_segmentation(tmp_path, "data/masks", tmp_path / "seg", {"captions": 1.0}, 0, lambda _: None)


# ---------------------------------------------------------------- the legend the stages read


def test_a_folder_without_legend_is_an_error_unless_the_caller_names_its_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        read_legend(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "legend.json") in message and "re-run prepare" in message and "ms2rgb data masks" in message
    assert read_legend(tmp_path, missing={"water": "open water"}) == {"water": "open water"}


# ---------------------------------------------------------------- the command and the pipeline


def test_the_cli_command_tiles_into_the_params_folder_and_refuses_inputs_inside_it(
    inputs: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    images, masks, legend = inputs
    argv = ["--root", str(root), "data", "masks", "--images", str(images), "--masks", str(masks)]
    assert cli_main([*argv, "--legend", str(legend)]) == 0
    out = capsys.readouterr().out
    assert f"10 tiles of 4 images written to {root / 'data/masks' / IMPORT_DIR}" in out
    assert "set data.segmentation.source: folder" in out  # the default source is synth
    assert "tiles left out: 0 without label, 0 more than 90 % unlabelled" in out
    assert len(read_manifest(root / "data/masks" / IMPORT_DIR / MANIFEST_NAME)) == 10
    inside = root / "data/masks" / IMPORT_DIR / "legend.yaml"
    inside.write_text(legend.read_text())
    assert cli_main([*argv, "--legend", str(inside)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ms2rgb: error: ") and "--legend lies inside" in err and "\n" not in err
    assert inside.is_file()
