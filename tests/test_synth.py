"""The embedded synthetic source: seeded, georeferenced, spectrally plausible, with masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from helpers_params import config

from ms2rgb.models.bands import S2_BANDS
from ms2rgb.tasks.data.classes import SCENE_NAMES, SURFACE_NAMES
from ms2rgb.tasks.data.manifest import SEGMENTATION_SPLITS
from ms2rgb.tasks.data.sources.spectra import VISIBLE_BAND_INDEX, surface_spectra
from ms2rgb.tasks.data.sources.synth import generate

SMALL = config("synth", per_class={"ms_train": 2, "test": 1, "fewshot": 1})


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = pd.read_parquet(generate(tmp_path / "a", SMALL, 0, progress=lambda _: None))
    b = pd.read_parquet(generate(tmp_path / "b", SMALL, 0, progress=lambda _: None))
    c = pd.read_parquet(generate(tmp_path / "c", SMALL, 1, progress=lambda _: None))
    assert a["sha256"].tolist() == b["sha256"].tolist()
    assert set(a["sha256"]).isdisjoint(set(c["sha256"]))


def test_layout_georeference_and_masks(tmp_path: Path) -> None:
    frame = pd.read_parquet(generate(tmp_path, SMALL, 0, progress=lambda _: None))
    assert len(frame) == len(SCENE_NAMES) * (2 + 2 * 1 + 1)  # test locations carry both modalities
    ms = frame[frame["modality"] == "ms"].iloc[0]
    assert ms["path"].startswith(f"tiles/ms/{ms['class']}/")  # EuroSAT layout: one folder per class
    with rasterio.open(tmp_path / ms["path"]) as src:
        assert (src.count, src.dtypes[0], src.width, src.height) == (13, "uint16", 64, 64)
        assert src.crs.to_string() == "EPSG:32633" and src.res == (10.0, 10.0)
        assert src.descriptions == S2_BANDS
        assert src.bounds.left == ms["bounds_left"] and src.bounds.top == ms["bounds_top"]
    assert frame.loc[~frame["split"].isin(SEGMENTATION_SPLITS), "mask_path"].isna().all()  # scene tiles: none
    seg = frame[frame["split"].isin(SEGMENTATION_SPLITS)].iloc[0]
    with rasterio.open(tmp_path / seg["mask_path"]) as src:
        mask = src.read(1)
    assert mask.shape == (64, 64) and mask.max() < len(SURFACE_NAMES)
    rgb = frame[(frame["modality"] == "rgb") & (frame["location_id"] == frame["location_id"].iloc[-1])]
    with rasterio.open(tmp_path / rgb.iloc[0]["path"]) as src:
        assert (src.count, src.dtypes[0]) == (3, "uint8")


def test_spectra_are_physically_shaped() -> None:
    table = surface_spectra(0.0)
    red, nir = S2_BANDS.index("B04"), S2_BANDS.index("B08")
    ndvi = (table[:, nir] - table[:, red]) / (table[:, nir] + table[:, red])
    assert ndvi[SURFACE_NAMES.index("forest")] > 0.6
    assert ndvi[SURFACE_NAMES.index("water")] < -0.2
    assert table[SURFACE_NAMES.index("water"), nir] < 400  # real SeaLake B08 ~ 315


def test_rgb_ambiguity_controls_the_visible_gap_only() -> None:
    crop, grass = SURFACE_NAMES.index("crop"), SURFACE_NAMES.index("grass")
    vis = list(VISIBLE_BAND_INDEX)
    full = surface_spectra(1.0)
    none = surface_spectra(0.0)
    assert np.allclose(full[crop, vis], full[grass, vis])
    assert not np.allclose(none[crop, vis], none[grass, vis])
    nir = S2_BANDS.index("B08")
    assert full[crop, nir] - full[grass, nir] == none[crop, nir] - none[grass, nir]
