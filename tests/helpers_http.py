"""A loopback HTTP server over a folder, with the Range requests GDAL's /vsicurl/ needs, and a log of
the bytes it sent per path.

Python's http.server answers no Range request, and GDAL then refuses the file ("Range downloading
not supported by this server!"); real hosts (object stores, STAC APIs) answer them. The server runs
in its own process: in a thread of the test process it would wait for the GIL while rasterio holds it
in a read that waits on the server.

Usage as a script (what `serve` runs): python helpers_http.py FOLDER LOG; prints the port.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of files under the folder; `Range: bytes=a-b` answered with 206 and that slice."""

    protocol_version = "HTTP/1.1"  # keep-alive, as GDAL's curl expects
    log_path: Path

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self) -> BinaryIO | None:  # type: ignore[override]
        path = Path(self.translate_path(self.path))
        match = _RANGE.fullmatch(self.headers.get("Range", ""))
        if match is None or not path.is_file():
            body = super().send_head()
            if body is not None and self.command == "GET":
                self._log(path.stat().st_size)
            return body  # type: ignore[return-value]
        data = path.read_bytes()
        start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._log(end - start + 1)
        return io.BytesIO(data[start : end + 1])

    def _log(self, sent: int) -> None:
        with self.log_path.open("a") as log:
            log.write(json.dumps({"path": self.path, "bytes": sent}) + "\n")


@contextmanager
def serve(folder: Path, log: Path) -> Iterator[str]:
    """http://127.0.0.1:<port> serving `folder` until the block ends; each GET appends to `log`."""
    process = subprocess.Popen([sys.executable, __file__, str(folder), str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield f"http://127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def bytes_sent(log: Path) -> dict[str, int]:
    """Path -> bytes the server sent for it, over all requests."""
    sent: dict[str, int] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        sent[entry["path"]] = sent.get(entry["path"], 0) + entry["bytes"]
    return sent


def main(folder: str, log: str) -> None:
    handler = type("Handler", (RangeHandler,), {"log_path": Path(log)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=folder))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
