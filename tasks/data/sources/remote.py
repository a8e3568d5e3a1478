"""Inputs given as http(s) URLs: a STAC item's JSON fetched once, its band assets read in place.

The item is a few KB, fetched with a timeout (pystac's own reader has none, so a silent server
would hang ingestion) and each failure said in one line: the HTTP status, or why the host could
not be reached. Band assets are never downloaded to a file: rasterio opens a URL through GDAL's
/vsicurl/, which reads the byte ranges it needs (the server must answer HTTP Range requests, as
object stores and STAC hosts do) and keeps them in its block cache, so each byte crosses once.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from ms2rgb.tasks.errors import RasterError

TIMEOUT_S = 60.0  # per request; a STAC item is a few KB
# Opened from a URL, GDAL would otherwise list the "folder" and probe ~30 sidecar names per file
# (.aux.xml, .RPB, ...): one HTTP request each, for files a STAC asset never has.
REMOTE_GDAL_OPTIONS: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_TIMEOUT": 60}
_ITEM_FIX = "check the URL: it must return one STAC item's JSON (a STAC API's .../collections/<c>/items/<id>)"


def is_url(path: object) -> bool:
    """Whether an input is a URL (http, https, s3, ...) rather than a local path."""
    return isinstance(path, str) and "://" in path


def fetch_text(url: str) -> str:
    """The body of an http(s) URL as text, or one RasterError naming the URL and the fix."""
    request = urllib.request.Request(url, headers={"Accept": "application/geo+json, application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as exc:
        raise RasterError(url, f"the server answered HTTP {exc.code} ({exc.reason})", _ITEM_FIX) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RasterError(
            url, f"could not be reached ({reason})", "check the host and port, and that the server is up"
        ) from exc
    except ValueError as exc:  # e.g. a scheme urllib does not speak
        raise RasterError(url, f"is not a URL that can be fetched ({exc})", "give an http(s) URL") from exc
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RasterError(url, "returned binary data, not JSON", _ITEM_FIX) from exc
