"""Spatial layouts of synthetic scenes: each scene class draws a (64, 64) map of surface ids.

Classes that real RGB confuses share one layout family (AnnualCrop / Pasture /
HerbaceousVegetation all use field parcels; Highway / Industrial both use paved strips and
blocks), so shape alone cannot separate them and only their surfaces' spectra can.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ms2rgb.tasks.data.classes import SURFACE_NAMES

S = {name: i for i, name in enumerate(SURFACE_NAMES)}
Layout = Callable[[np.random.Generator, int], np.ndarray]


def _grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float32)  # (2, size, size): rows, cols


def _parcels(rng: np.random.Generator, size: int, main: int, other: int) -> np.ndarray:
    """Voronoi field parcels, most of them `main`, the rest `other` (fallow / between seasons)."""
    n = int(rng.integers(4, 10))
    seeds = rng.uniform(0, size, (n, 2))
    rows, cols = _grid(size)
    dist = (rows[None] - seeds[:, 0, None, None]) ** 2 + (cols[None] - seeds[:, 1, None, None]) ** 2
    parcel = dist.argmin(axis=0)  # (size, size) parcel index
    share_main = rng.uniform(0.7, 0.95)
    is_main = rng.random(n) < share_main
    is_main[0] = True
    return np.where(is_main[parcel], main, other).astype(np.uint8)


def _blobs(rng: np.random.Generator, size: int, base: int, spot: int, n: int, radius: float) -> np.ndarray:
    out = np.full((size, size), base, np.uint8)
    rows, cols = _grid(size)
    for _ in range(n):
        r, c = rng.uniform(0, size, 2)
        rad = radius * rng.uniform(0.5, 1.5)
        out[(rows - r) ** 2 + (cols - c) ** 2 < rad**2] = spot
    return out


def _strips_and_blocks(rng: np.random.Generator, size: int, paved: int) -> np.ndarray:
    """One or two straight paved strips plus a few paved blocks on grass."""
    out = np.full((size, size), S["grass"], np.uint8)
    rows, cols = _grid(size)
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-size / 4, size / 4)
        dist = np.abs((rows - size / 2) * np.cos(angle) - (cols - size / 2) * np.sin(angle) - offset)
        out[dist < rng.uniform(3, 7)] = paved
    for _ in range(int(rng.integers(2, 6))):
        r, c = rng.integers(0, size - 8, 2)
        h, w = rng.integers(6, 18, 2)
        out[r : r + h, c : c + w] = paved
    return out


def annual_crop(rng, size):
    return _parcels(rng, size, S["crop"], S["soil"])


def pasture(rng, size):
    return _parcels(rng, size, S["grass"], S["soil"])


def herbaceous(rng, size):
    return _parcels(rng, size, S["herb"], S["soil"])


def forest(rng, size):
    return _blobs(rng, size, S["forest"], S["grass"], int(rng.integers(0, 4)), 5)


def permanent_crop(rng, size):
    out = np.full((size, size), S["grass"] if rng.random() < 0.5 else S["soil"], np.uint8)
    step = int(rng.integers(5, 8))
    rows, cols = _grid(size)
    phase = rng.uniform(0, step, 2)
    trees = ((rows + phase[0]) % step < 3) & ((cols + phase[1]) % step < 3)
    out[trees] = S["forest"]
    return out


def highway(rng, size):
    return _strips_and_blocks(rng, size, S["asphalt"])


def industrial(rng, size):
    return _strips_and_blocks(rng, size, S["concrete"])


def residential(rng, size):
    out = np.full((size, size), S["grass"], np.uint8)
    step = int(rng.integers(10, 15))
    rows, cols = _grid(size)
    phase = rng.integers(0, step, 2)
    street = ((rows + phase[0]) % step < 2) | ((cols + phase[1]) % step < 2)
    houses = (
        ((rows + phase[0]) % step >= 4)
        & ((rows + phase[0]) % step < step - 2)
        & ((cols + phase[1]) % step >= 4)
        & ((cols + phase[1]) % step < step - 2)
    )
    out[houses] = S["roof"]
    out[street] = S["asphalt"]
    return out


def river(rng, size):
    out = np.full((size, size), S["grass"] if rng.random() < 0.6 else S["forest"], np.uint8)
    rows, cols = _grid(size)
    amp, freq, phase = rng.uniform(3, 12), rng.uniform(0.05, 0.15), rng.uniform(0, 2 * np.pi)
    centre = size / 2 + rng.uniform(-10, 10) + amp * np.sin(freq * rows + phase)
    dist = np.abs(cols - centre)
    if rng.random() < 0.5:
        dist = dist.T
    out[dist < rng.uniform(3, 8)] = S["water"]
    return out


def sea_lake(rng, size):
    out = np.full((size, size), S["water"], np.uint8)
    if rng.random() < 0.5:  # a shore along one edge
        rows, cols = _grid(size)
        shore = rng.uniform(0, size * 0.3) + 3 * np.sin(cols * rng.uniform(0.05, 0.2))
        out[rows < shore] = S["soil"] if rng.random() < 0.5 else S["grass"]
        out = np.rot90(out, int(rng.integers(0, 4))).copy()
    return out


LAYOUTS: dict[str, Layout] = {
    "AnnualCrop": annual_crop,
    "Forest": forest,
    "HerbaceousVegetation": herbaceous,
    "Highway": highway,
    "Industrial": industrial,
    "Pasture": pasture,
    "PermanentCrop": permanent_crop,
    "Residential": residential,
    "River": river,
    "SeaLake": sea_lake,
}
