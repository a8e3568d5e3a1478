"""`ms2rgb`: the command line for everything a user does by hand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ms2rgb.flows.lock import project_lock
from ms2rgb.tasks.errors import Ms2rgbError


class _QuietUserErrors(logging.Filter):
    """Console filter: a user's mistake is printed once, as one line, by main(); Prefect's own
    tracebacks of it (and its failed-state summaries) stay in the run logs on the API."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, Ms2rgbError):
            return False
        return not (record.levelno >= logging.ERROR and "Finished in state Failed" in record.getMessage())


def _quiet_prefect_console() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        for handler in logging.getLogger(name).handlers + logging.getLogger().handlers:
            if not any(isinstance(f, _QuietUserErrors) for f in handler.filters):
                handler.addFilter(_QuietUserErrors())


def _cmd_run(args: argparse.Namespace) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from ms2rgb.tasks.config import load_params

    root = Path(args.root).resolve()
    load_params(root)  # every section checked before the first stage starts
    from ms2rgb.flows.pipeline import pipeline

    if not args.verbose:
        _quiet_prefect_console()
    with project_lock(root, "ms2rgb run", args.wait):
        reports = pipeline(root=str(root), until=args.until, force=args.force)
    ran = [name for name, report in reports.items() if report is not None]
    print(f"\nstages run: {ran or 'none (all fresh per dvc.lock)'}")
    print("where to look:")
    print(f"  reports:     {root / 'reports'}/<stage>.json")
    print(f"  data docs:   {root / 'reports' / 'validate' / 'data_docs'} (open index.html)")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} (then http://127.0.0.1:5000)")


def _cmd_stage(args: argparse.Namespace) -> None:
    from ms2rgb.flows.stages import run_stage

    root = Path(args.root).resolve()
    with project_lock(root, f"ms2rgb stage {args.name}", args.wait):
        run_stage(args.name, root)


def _cmd_synth(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.data.sources.synth import generate

    params = load_params(Path(args.root))
    with project_lock(Path(args.root), "ms2rgb data synth", args.wait):
        print(f"manifest: {generate(Path(args.out), params.synth, params.seed)}")


def _cmd_eurosat(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.data.sources.eurosat import ingest_eurosat

    with project_lock(Path(args.root), "ms2rgb data eurosat", args.wait):
        frame = ingest_eurosat(
            Path(args.ms), Path(args.out), rgb_dir=Path(args.rgb) if args.rgb else None, seed=args.seed
        )
    print(f"{len(frame)} tiles; manifest: {Path(args.out) / 'manifest.parquet'}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.data.sources.scenes import ingest_scene

    scenes_dir = Path(args.root) / load_params(Path(args.root)).data.scenes_dir
    with project_lock(Path(args.root), "ms2rgb data ingest", args.wait):
        frame = ingest_scene([Path(p) for p in args.scene], scenes_dir, scene_id=args.scene_id)
    print(f"{len(frame)} tiles added to the MS pool under {scenes_dir}; the next run re-prepares the data")


def _cmd_detect(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.detection.detect import detect

    result = detect(
        Path(args.image), args.classes, Path(args.out), root=Path(args.root), model_uri=args.model, stride=args.stride
    )
    print(f"model: {result['model']}")
    print("class shares: " + ", ".join(f"{name} {share:.1%}" for name, share in result["shares"].items()))
    for kind, path in result["outputs"].items():
        print(f"{kind:16s} {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms2rgb", description=__doc__)
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors (and Prefect's)")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another ms2rgb command to release the project (default: 0)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the Prefect pipeline flow (stale stages only)")
    run.add_argument("--until", help="last stage to run")
    run.add_argument("--force", action="store_true", help="run stages even when DVC says they are fresh")
    run.set_defaults(func=_cmd_run)
    stage = sub.add_parser("stage", help="run one stage without Prefect (what dvc.yaml calls)")
    stage.add_argument("name")
    stage.set_defaults(func=_cmd_stage)
    data = sub.add_parser("data", help="make or ingest data").add_subparsers(dest="source", required=True)
    synth = data.add_parser("synth", help="generate the embedded synthetic data set")
    synth.add_argument("--out", default="data/synth")
    synth.set_defaults(func=_cmd_synth)
    eurosat = data.add_parser("eurosat", help="ingest the real EuroSAT_MS (and RGB) layout")
    eurosat.add_argument("--ms", required=True, help="EuroSAT_MS root: <Class>/<Class>_<n>.tif")
    eurosat.add_argument("--rgb", help="EuroSAT RGB root: <Class>/<Class>_<n>.jpg")
    eurosat.add_argument("--out", default="data/eurosat")
    eurosat.add_argument("--seed", type=int, default=0)
    eurosat.set_defaults(func=_cmd_eurosat)
    ingest = data.add_parser("ingest", help="add a Sentinel-2 scene (GeoTIFF or per-band JP2/TIF) to the MS pool")
    ingest.add_argument("scene", nargs="+", help="one 13-band GeoTIFF, or the per-band files of one scene")
    ingest.add_argument("--scene-id", help="name of the scene folder (default: derived from the file names)")
    ingest.set_defaults(func=_cmd_ingest)
    det = sub.add_parser(
        "detect", help="land-cover class map of an RGB (or 13-band MS) GeoTIFF with the tuned detector"
    )
    det.add_argument("image", help="GeoTIFF: 3-band uint8 RGB or 13-band uint16 Sentinel-2, any size, with a CRS")
    det.add_argument(
        "--classes",
        required=True,
        help='comma-separated surface/scene names or free descriptions, e.g. "water,forest,red tiled roofs"',
    )
    det.add_argument("--out", default="detections", help="output folder (default: detections)")
    det.add_argument("--model", help="MLflow model URI, e.g. models:/ms2rgb-detector/1 (default: artifacts/detector/)")
    det.add_argument(
        "--stride", type=int, default=32, help="window step in px; < 64 overlaps and averages (default 32)"
    )
    det.set_defaults(func=_cmd_detect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Ms2rgbError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"ms2rgb: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
