"""Exceptions a user can cause. Each message names the file or key, the value, and the fix."""

from __future__ import annotations

from typing import Any


class Ms2rgbError(Exception):
    """Base class: anything the user can fix by changing input or params."""

    # A stage that fails with a report attached (e.g. a failed validation) sets this; the flow
    # still writes it to reports/<stage>.json before the error propagates.
    report: dict[str, Any] | None = None


class ParamsError(Ms2rgbError):
    """A params.yaml key is missing or has a bad value."""

    def __init__(self, key: str, value: object, fix: str) -> None:
        super().__init__(f"params.yaml: {key}={value!r} is invalid: {fix}")
        self.key, self.value, self.fix = key, value, fix


class ParamsFileError(Ms2rgbError):
    """params.yaml is missing or is not YAML: the message names the file (and line and column)."""


class DataError(Ms2rgbError):
    """Stage inputs (cached tiles, upstream artifacts) are missing or do not fit together."""

    def __init__(self, where: object, problem: str, fix: str) -> None:
        super().__init__(f"{where}: {problem}. Fix: {fix}")
        self.where, self.problem = where, problem


class RasterError(DataError):
    """A GeoTIFF/JP2 cannot be read or has the wrong bands, dtype, values or CRS."""

    def __init__(self, path: object, problem: str, fix: str) -> None:
        super().__init__(path, problem, fix)
        self.path = path


class SceneAlreadyInPool(Ms2rgbError):
    """Every tile of a scene is in the pool already (under any scene id): nothing to ingest."""


class DatasetLayoutError(Ms2rgbError):
    """A dataset folder does not have the expected layout."""


class UnknownClassError(Ms2rgbError):
    """A class name is not one of the configured scene or land-cover classes."""

    def __init__(self, name: str, valid: list[str], where: str) -> None:
        super().__init__(f"{where}: unknown class {name!r}; valid classes are {valid}")
        self.name = name


class ValidationFailed(Ms2rgbError):
    """The validate stage found failed expectations; training must not start."""

    def __init__(self, failures: list[str], report: str) -> None:
        lines = "\n  - ".join(failures)
        super().__init__(
            f"data validation failed ({len(failures)} expectation(s)); details in {report}:\n  - {lines}\n"
            "Fix the listed tiles/files (or re-run `ms2rgb data ...`) and run the pipeline again."
        )
        self.failures = failures


class BandCountError(DataError):
    """Tiles carry a different number of bands than the model was built for."""


class EmptyPoolError(DataError):
    """A scene class has no MS pool tile, so its RGB tiles cannot be paired."""


class PairsTableError(DataError):
    """The pairs table has the wrong columns or points at tiles that do not exist."""
