#!/usr/bin/env bash
# Render the evaluation report (reports/index.html) in headless Chromium and save a screenshot.
#
# Usage: bench/report_screenshot.sh [ROOT_OR_HTML] [OUT_PNG]
#   ROOT_OR_HTML  a project root (its reports/index.html is used) or an .html file; default: the
#                 repository root, i.e. the page `ms2rgb stage evaluate` wrote
#   OUT_PNG       where the screenshot goes; default: ${TMPDIR:-/tmp}/ms2rgb-report.png
#   WINDOW        environment variable, the window size as WIDTHxHEIGHT pixels; default 1280,4000
#                 (a tall window, so one image shows most of the page; Chromium cuts at its bottom)
#
# Prints the PNG's path. The page is opened as file://, with no server and no network, exactly as
# someone double-clicking it would (it is self-contained: images are data URIs, no JavaScript).
# Needs Debian's `chromium` (`apt-get install -y chromium`); --no-sandbox lets it run as root in a
# container, a throwaway --user-data-dir keeps it away from any real browser profile.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-$repo}"
out="${2:-${TMPDIR:-/tmp}/ms2rgb-report.png}"
window="${WINDOW:-1280,4000}"

if [[ -d "$target" ]]; then
    page="$target/reports/index.html"
else
    page="$target"
fi
if [[ ! -f "$page" ]]; then
    echo "report_screenshot: no page at $page; run the evaluate stage first (ms2rgb stage evaluate)" >&2
    exit 2
fi
browser="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$browser" ]]; then
    echo "report_screenshot: chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi

page="$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
rm -f "$out"

timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --no-first-run --no-default-browser-check \
    --screenshot="$out" --window-size="$window" "file://$page" >/dev/null 2>"$profile/chromium.log" || {
    echo "report_screenshot: chromium failed; its log:" >&2
    cat "$profile/chromium.log" >&2
    exit 1
}
if [[ ! -s "$out" ]]; then
    echo "report_screenshot: chromium wrote no screenshot; its log:" >&2
    cat "$profile/chromium.log" >&2
    exit 1
fi
echo "$out"
