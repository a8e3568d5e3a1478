"""Scene classes (EuroSAT) and land-cover surfaces (mask values), each with a text description."""

from __future__ import annotations

import numpy as np

# The 10 EuroSAT scene classes, in EuroSAT's alphabetical order (class index = position).
SCENE_CLASSES: dict[str, str] = {
    "AnnualCrop": "fields of annual crops such as cereals, with bare soil between seasons",
    "Forest": "dense tree canopy covering most of the ground",
    "HerbaceousVegetation": "natural herbaceous vegetation, meadows of wild grasses and herbs",
    "Highway": "a wide paved road crossing fields or grassland",
    "Industrial": "large industrial buildings, warehouses and paved yards",
    "Pasture": "grazed grassland used for livestock",
    "PermanentCrop": "orchards or vineyards planted in regular rows",
    "Residential": "houses with roofs, gardens and small streets",
    "River": "a river winding through land",
    "SeaLake": "open water of a sea or lake",
}
SCENE_NAMES: list[str] = list(SCENE_CLASSES)

# Land-cover surfaces: the values of per-pixel masks (index = mask value).
SURFACE_CLASSES: dict[str, str] = {
    "crop": "green cropland",
    "grass": "grass and pasture",
    "herb": "natural herbaceous vegetation",
    "forest": "trees and forest canopy",
    "soil": "bare soil",
    "water": "water",
    "asphalt": "asphalt road",
    "concrete": "concrete and industrial roofs",
    "roof": "red tiled house roofs",
}
SURFACE_NAMES: list[str] = list(SURFACE_CLASSES)
MASK_NODATA = 255


def first_k_of_each(groups: np.ndarray, k: int | None) -> np.ndarray:
    """Boolean mask of the first `k` rows (in order) of each group value >= 0; every such row when k is None.
    The K-shot sets of both methods: the student's labelled tiles, the detector's few-shot tiles."""
    keep = groups >= 0
    if k is None:
        return keep
    chosen = np.zeros(len(groups), dtype=bool)
    for value in np.unique(groups[keep]):
        chosen[np.flatnonzero(groups == value)[:k]] = True
    return chosen
