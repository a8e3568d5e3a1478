"""Real Sentinel-2 products as scene inputs (issue 25): the baseline 04.00 offset, .SAFE folders, their
zips and STAC items (local, or served over loopback HTTP), through `ingest_scene`, `ms2rgb data ingest`
and the landing watch.

Every product here holds one ground (tests/helpers_s2_products.py); whatever form it comes in, its
tiles must be the tiles of that ground given as bare band files with no offset (`reference`).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from conftest import REPO
from helpers_http import bytes_sent, serve
from helpers_s2_products import (
    ground,
    safe_band_files,
    shifted,
    tree_state,
    write_band_files,
    write_l2a_safe,
    write_safe,
    write_stac_item,
    zip_folder,
)

from ms2rgb.flows import landing
from ms2rgb.flows.cli import main
from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.config import load_params
from ms2rgb.tasks.data.manifest import read_manifest
from ms2rgb.tasks.data.sources.radiometry import NO_OFFSET, Radiometry, given_offset
from ms2rgb.tasks.data.sources.scenes import INGEST_REPORT, ingest_scene
from ms2rgb.tasks.errors import Ms2rgbError

SEED = 3  # the ground every comparison is made on
OFFSET = -1000  # RADIO_ADD_OFFSET of processing baseline 04.00


def ingest(inputs: list[Path | str], out: Path, given: Radiometry = NO_OFFSET) -> pd.DataFrame:
    return ingest_scene(inputs, out, scene_id="s", progress=None, radiometry=given)


def arrays(frame: pd.DataFrame, out: Path) -> dict[str, np.ndarray]:
    """location id -> (13, 64, 64) tile."""
    result = {}
    for location, rel in zip(frame["location_id"], frame["path"]):
        with rasterio.open(out / rel) as tile:
            result[location] = tile.read()
    return result


def radiometry(out: Path, scene: str = "s") -> dict[str, Any]:
    return json.loads((out / scene / INGEST_REPORT).read_text())["radiometry"]


def light_root(path: Path, **data: object) -> Path:
    """A project root with params.yaml only (what `ms2rgb data ingest` and the landing watch read)."""
    path.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(data)
    params["landing"]["stable_polls"] = 1
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], dict[str, np.ndarray], Path]:
    """The ground as bare band files without offset, ingested: sha256s, arrays, and the pool holding it."""
    tmp = tmp_path_factory.mktemp("reference")
    frame = ingest(list(write_band_files(tmp / "bands", ground(SEED))), tmp / "pool")
    return set(frame["sha256"]), arrays(frame, tmp / "pool"), tmp / "pool"


# ---------------------------------------------------------------- the baseline 04.00 offset


def test_a_baseline_04_product_gives_the_tiles_of_its_unshifted_twin(
    tmp_path: Path, reference: tuple[set[str], dict[str, np.ndarray], Path]
) -> None:
    shas, tiles, _ = reference
    old = write_safe(tmp_path / "old", ground(SEED), baseline="03.01", offset=None)  # DN = reflectance x10000
    new = write_safe(tmp_path / "new", shifted(ground(SEED), OFFSET), baseline="04.00")  # DN = ... + 1000
    assert set(ingest([old], tmp_path / "a")["sha256"]) == shas
    assert set(ingest([new], tmp_path / "b")["sha256"]) == shas  # bit-exact, 20 and 60 m bands too
    assert radiometry(tmp_path / "a") | {"origin": None} == {
        "source": "metadata",
        "offsets": dict.fromkeys(S2_BANDS, 0.0),
        "quantification": 10000.0,
        "baseline": "03.01",
        "level": "L1C",
        "origin": None,
        "notes": [],
    }
    applied = radiometry(tmp_path / "b")
    assert applied["offsets"] == dict.fromkeys(S2_BANDS, -1000.0) and applied["baseline"] == "04.00"
    assert str(applied["origin"]).endswith(".SAFE/MTD_MSIL1C.xml") and applied["source"] == "metadata"
    # What ingestion did before: the shifted DNs taken as reflectance, every band 1000 (0.1) too bright.
    naive = ingest(list(safe_band_files(new).values()), tmp_path / "c")
    for location, tile in arrays(naive, tmp_path / "c").items():
        assert np.abs(tile.astype(int) - tiles[location] - 1000).max() <= 1


def test_dark_valid_pixels_stay_valid_and_no_data_stays_no_data(tmp_path: Path) -> None:
    applied = given_offset(OFFSET, "option", "--offset").apply("B02", np.array([0, 1, 500, 1000, 1001, 6000], "f4"))
    assert applied.tolist() == [0, 1, 1, 1, 1, 5000]
    bands = shifted(ground(SEED), OFFSET)
    bands["B04"][:4, :4] = 900  # darker than the offset: reflectance <= 0, still a pixel with data
    bands["B03"][-4:, -4:] = 0  # no data
    option = given_offset(OFFSET, "option", "--offset")
    frame = ingest(list(write_band_files(tmp_path / "bands", bands)), tmp_path / "out", given=option)
    kept = arrays(frame, tmp_path / "out")
    assert (kept["s_r0_c0"][S2_BANDS.index("B04"), :4, :4] == 1).all()  # kept (min_valid 1.0), at 1
    assert "s_r2_c2" not in kept and len(kept) == 8  # the no-data corner's tile is skipped
    with pytest.raises(Ms2rgbError, match=r"--offset=1000 is out of range.*\[-10000, 0\]"):
        given_offset(1000, "option", "--offset")


# ---------------------------------------------------------------- the forms a product comes in


@pytest.mark.parametrize("form", ["safe", "zip", "stac_item", "stac_folder"])
def test_each_form_of_a_product_gives_the_tiles_of_the_band_files(
    tmp_path: Path, form: str, reference: tuple[set[str], dict[str, np.ndarray], Path]
) -> None:
    safe = write_safe(tmp_path / "product", shifted(ground(SEED), OFFSET))
    given: Path = safe
    if form == "zip":
        given = zip_folder(safe, tmp_path / f"{safe.name}.zip")
        shutil.rmtree(safe)  # read from the zip itself, nothing extracted beside it
    elif form == "stac_item":  # hrefs relative to the item, into the product folder
        given = write_stac_item(tmp_path / "items" / "item.json", safe_band_files(safe), (0.0001, -0.1))
    elif form == "stac_folder":  # a folder holding one item and its assets
        (tmp_path / "scene").mkdir()
        copies = {b: Path(shutil.copy(f, tmp_path / "scene")) for b, f in safe_band_files(safe).items()}
        given = write_stac_item(tmp_path / "scene" / "item.json", copies, (0.0001, -0.1)).parent
    lines: list[str] = []
    frame = ingest_scene([given], tmp_path / "out", progress=lines.append)
    assert set(frame["sha256"]) == reference[0]
    scene = frame["path"].iloc[0].split("/")[0]  # the product's name (the item's id for STAC)
    expected = "S2A_33UUP_20220105_0_L1C" if form.startswith("stac") else safe.name.removesuffix(".SAFE")
    assert scene == expected
    applied = radiometry(tmp_path / "out", scene)
    assert applied["source"] == "metadata" and set(applied["offsets"].values()) == {-1000.0}
    assert any("radiometry: offset -1000, quantification 10000 (metadata from" in line for line in lines)


def test_a_level_2a_product_takes_each_band_at_its_finest_resolution(
    tmp_path: Path, reference: tuple[set[str], dict[str, np.ndarray], Path]
) -> None:
    # Real L2A products have no B10; this one carries it so that all 13 bands can be compared.
    safe = write_l2a_safe(tmp_path, shifted(ground(SEED), OFFSET))
    assert set(ingest([safe], tmp_path / "out")["sha256"]) == reference[0]
    applied = radiometry(tmp_path / "out")
    assert applied["level"] == "L2A" and set(applied["offsets"].values()) == {-1000.0}


def test_bare_band_files_with_the_offset_option_match_the_04_product(
    tmp_path: Path, reference: tuple[set[str], dict[str, np.ndarray], Path]
) -> None:
    root = light_root(tmp_path / "project")
    bands = write_band_files(tmp_path / "bands", shifted(ground(SEED), OFFSET))
    args = ["--root", str(root), "data", "ingest", *map(str, bands), "--scene-id", "s"]
    assert main([*args, "--offset", "-1000"]) == 0
    scenes = root / "data" / "scenes"
    assert set(read_manifest(scenes / "s" / "manifest.parquet")["sha256"]) == reference[0]
    applied = radiometry(scenes)
    assert applied["source"] == "option" and applied["origin"] == "--offset"


# ---------------------------------------------------------------- a STAC item without raster:bands


@pytest.mark.parametrize(
    "baseline, dn_offset, given, source, offset",
    [  # Earth Search's items: s2:processing_baseline, and no raster:bands on older collections
        ("05.09", OFFSET, NO_OFFSET, "baseline", -1000.0),
        ("04.00", OFFSET, NO_OFFSET, "baseline", -1000.0),
        ("03.01", 0, NO_OFFSET, "baseline", 0.0),  # before 04.00 ESA added none
        ("03.01", 0, given_offset(OFFSET, "param", "data.radiometric_offset"), "baseline", 0.0),
        ("05.09", 0, given_offset(0, "option", "--offset"), "option", 0.0),  # a host that shifted DNs back
        (None, OFFSET, given_offset(OFFSET, "param", "data.radiometric_offset"), "param", -1000.0),  # as before
        (None, 0, NO_OFFSET, "none", 0.0),  # as before: nothing stated, nothing given
    ],
)
def test_a_stac_item_without_raster_bands_takes_the_offset_of_its_baseline(
    tmp_path: Path,
    reference: tuple[set[str], dict[str, np.ndarray], Path],
    baseline: str | None,
    dn_offset: int,
    given: Radiometry,
    source: str,
    offset: float,
) -> None:
    safe = write_safe(tmp_path / "product", shifted(ground(SEED), dn_offset), offset=dn_offset or None)
    item = write_stac_item(tmp_path / "item.json", safe_band_files(safe), None, baseline=baseline)
    assert set(ingest([item], tmp_path / "out", given)["sha256"]) == reference[0]
    applied = radiometry(tmp_path / "out")
    assert applied["source"] == source and set(applied["offsets"].values()) == {offset}
    assert applied["baseline"] == baseline and applied["level"] == ("L1C" if baseline else None)
    notes = " ".join(applied["notes"])  # which rule gave the offset, in ingest.json
    if source == "baseline":
        assert applied["origin"] == f"{item} (s2:processing_baseline)"
        assert f"no raster:bands offsets; s2:processing_baseline {baseline} gives {offset:g}" in notes
    elif source == "option":
        assert "--offset 0 given over the baseline rule (no raster:bands offsets; s2:processing_baseline 05.09" in notes
    else:
        assert f"{item} states no offset (no raster:bands offsets, no s2:processing_baseline)" in notes
        assert f"the offset for bare files applies: offset {offset:g}" in notes


def test_a_stac_item_with_a_malformed_baseline_is_refused(tmp_path: Path) -> None:
    safe = write_safe(tmp_path / "product", shifted(ground(SEED), OFFSET))
    item = write_stac_item(tmp_path / "item.json", safe_band_files(safe), None, baseline="N0509")
    with pytest.raises(Ms2rgbError, match=r"s2:processing_baseline='N0509' is not a processing baseline like '04.00'"):
        ingest([item], tmp_path / "out")


# ---------------------------------------------------------------- a STAC item from a URL

ITEM_ID = "S2A_33UUP_20220105_0_L1C"


def served_folder(tmp: Path) -> tuple[Path, dict[str, Path]]:
    """A folder to serve: a product, and items/item.json whose hrefs are relative to the item
    (../product/...); returns the folder and the band files."""
    safe = write_safe(tmp / "www" / "product", shifted(ground(SEED), OFFSET))
    write_stac_item(tmp / "www" / "items" / "item.json", safe_band_files(safe), (0.0001, -0.1))
    return tmp / "www", safe_band_files(safe)


def test_a_stac_item_url_gives_the_tiles_of_the_local_item(
    tmp_path: Path, reference: tuple[set[str], dict[str, np.ndarray], Path]
) -> None:
    www, band_files = served_folder(tmp_path)
    local = ingest_scene([www / "items" / "item.json"], tmp_path / "local", progress=None)
    root = light_root(tmp_path / "project")
    with serve(www, tmp_path / "http.log") as base:
        url = f"{base}/items/item.json"
        assert main(["--root", str(root), "data", "ingest", url]) == 0
    scenes = root / "data" / "scenes"
    remote = read_manifest(scenes / ITEM_ID / "manifest.parquet")
    assert list(remote["sha256"]) == list(local["sha256"]) and set(remote["sha256"]) == reference[0]
    assert list(remote["location_id"]) == list(local["location_id"])
    applied = radiometry(scenes, ITEM_ID)
    assert applied["origin"] == f"{url} (raster:bands)" and set(applied["offsets"].values()) == {-1000.0}
    # Each band file is read in place through /vsicurl/ (relative hrefs resolved against the URL):
    # never more bytes than the file holds, nothing else fetched (no decoy asset, no sidecar probes).
    sent = bytes_sent(tmp_path / "http.log")
    served = {"/" + f.relative_to(www).as_posix(): f.stat().st_size for f in band_files.values()}
    assert set(sent) == {"/items/item.json", *served}
    assert all(0 < sent[path] <= size for path, size in served.items()), (sent, served)


def _missing_item(www: Path) -> str:
    return "/items/missing.json"


def _collection(www: Path) -> str:
    (www / "collection.json").write_text(json.dumps({"type": "Collection", "id": "c", "links": []}))
    return "/collection.json"


def _html_page(www: Path) -> str:
    (www / "index.html").write_text("<html><body>STAC browser</body></html>")
    return "/index.html"


def _missing_asset(www: Path) -> str:
    (www / "product").rename(www / "moved")  # the item's hrefs now point nowhere
    return "/items/item.json"


@pytest.mark.parametrize(
    "build, named, problem",
    [
        (
            _missing_item,
            "/items/missing.json",
            r": the server answered HTTP 404 \(File not found\)\. Fix: check the URL:",
        ),
        (_collection, "/collection.json", r": is not a STAC item \(its JSON is a 'Collection', not a Feature with"),
        (_html_page, "/index.html", r": is not JSON \(.*\)\. Fix: pass one STAC item's JSON"),
        (
            _missing_asset,
            "/product/",
            r"_B01.jp2: cannot be opened as a raster \(HTTP response code: 404\)\. Fix: check that",
        ),
    ],
)
def test_a_bad_stac_url_stops_with_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Callable[[Path], str], named: str, problem: str
) -> None:
    www, _ = served_folder(tmp_path)
    root = light_root(tmp_path / "project")
    path = build(www)
    with serve(www, tmp_path / "http.log") as base:
        assert main(["--root", str(root), "data", "ingest", f"{base}{path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ms2rgb: error: {base}{named}"), err
    assert re.search(problem, err), err
    assert not (root / "data" / "scenes").exists() or not any((root / "data" / "scenes").iterdir())


def test_an_unreachable_stac_url_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/item.json"
    root = light_root(tmp_path / "project")
    assert main(["--root", str(root), "data", "ingest", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ms2rgb: error: {url}: could not be reached (") and "Fix: check the host and port" in err


# ---------------------------------------------------------------- bad products


def missing_band(tmp: Path) -> Path:
    return write_safe(tmp, {b: a for b, a in shifted(ground(SEED), OFFSET).items() if b != "B8A"})


def two_granules(tmp: Path) -> Path:
    return write_safe(tmp, shifted(ground(SEED), OFFSET), granules=2)


def level_1b(tmp: Path) -> Path:
    return write_safe(tmp, shifted(ground(SEED), OFFSET), kind="S2MSI1B")


def l2a_without_b10(tmp: Path) -> Path:
    return write_l2a_safe(tmp, {b: a for b, a in shifted(ground(SEED), OFFSET).items() if b != "B10"})


def offset_04(tmp: Path) -> Path:
    return write_safe(tmp, shifted(ground(SEED), OFFSET))


def zip_without_product(tmp: Path) -> Path:
    write_band_files(tmp / "bands", ground(SEED))
    return zip_folder(tmp / "bands", tmp / "bands.zip")


@pytest.mark.parametrize(
    "build, options, problem",
    [
        (missing_band, [], r"lacks bands \['B8A'\] of the 13 Sentinel-2 bands \(looked in GRANULE/\*/IMG_DATA/\)"),
        (two_granules, [], r"mixes bands of 2 granules \(L1C_T33UUP_A034560_.*, L1C_T33UUP_A034561_.*\)"),
        (level_1b, [], r"MTD_MSIL1C.xml: is a 'Level-1B' product \(PROCESSING_LEVEL\), not Level-1C or Level-2A"),
        (l2a_without_b10, [], r"is a Level-2A product: it has no B10 .*Fix: ingest the Level-1C \(MSIL1C\) product"),
        (zip_without_product, [], r"bands.zip: holds no Sentinel-2 product: expected one MTD_MSIL1C.xml"),
        (offset_04, ["--offset", "0"], r"gives offset\(s\) \[-1000.0\] but --offset 0 was given. Fix: drop --offset"),
    ],
)
def test_a_bad_product_stops_with_one_line_and_leaves_the_pool_alone(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    reference: tuple[set[str], dict[str, np.ndarray], Path],
    build: Callable[[Path], Path],
    options: list[str],
    problem: str,
) -> None:
    root = light_root(tmp_path / "project")
    pool = root / "data" / "scenes"
    shutil.copytree(reference[2], pool)
    before = tree_state(pool)
    product = build(tmp_path)
    assert main(["--root", str(root), "data", "ingest", str(product), *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ms2rgb: error: {product}")
    assert re.search(problem, err), err
    assert tree_state(pool) == before  # no scene added, no partial folder left


# ---------------------------------------------------------------- the landing watch


def test_the_landing_watch_takes_products_as_one_scene_each(
    tmp_path: Path, reference: tuple[set[str], dict[str, np.ndarray], Path]
) -> None:
    root = light_root(tmp_path / "project", radiometric_offset=OFFSET)  # for the bare band folder
    drop = root / "data" / "landing"
    drop.mkdir(parents=True)
    write_safe(tmp_path / "p1", shifted(ground(21), OFFSET)).rename(drop / "p1.SAFE")
    zip_folder(write_safe(tmp_path / "p2", shifted(ground(22), OFFSET)), drop / "p2.SAFE.zip")
    elsewhere = write_safe(tmp_path / "p3", shifted(ground(23), OFFSET))  # the item's assets live outside
    write_stac_item(drop / "p3.json", safe_band_files(elsewhere), (0.0001, -0.1))
    write_band_files(drop / "bands", shifted(ground(SEED), OFFSET))  # bare: data.radiometric_offset applies
    zip_folder(missing_band(tmp_path / "broken"), drop / "broken.zip")
    result = landing.poll(root, load_params(root), progress=lambda _: None)
    status = {o.name: o.status for o in result.outcomes}
    assert status == {
        "p1.SAFE": "ingested",
        "p2.SAFE.zip": "ingested",
        "p3.json": "ingested",
        "bands": "ingested",
        "broken.zip": "quarantined",
    }
    scenes = root / "data" / "scenes"
    assert {p.name for p in scenes.iterdir()} == {"p1", "p2", "p3", "bands"}
    assert set(read_manifest(scenes / "bands" / "manifest.parquet")["sha256"]) == reference[0]
    assert radiometry(scenes, "bands")["source"] == "param"
    for scene in ("p1", "p2", "p3"):
        applied = radiometry(scenes, scene)
        assert applied["source"] == "metadata"
        assert applied["notes"] == ["data.radiometric_offset not used: the product's metadata applies"]
        red = [
            tile[S2_BANDS.index("B04")].mean()
            for tile in arrays(read_manifest(scenes / scene / "manifest.parquet"), scenes).values()
        ]
        assert 650 < np.mean(red) < 750  # the meadow's red, 700: the 1000 DN offset is gone
    reason = (root / "data" / "quarantine" / "broken.zip.reason.txt").read_text()
    assert "lacks bands ['B8A']" in reason
