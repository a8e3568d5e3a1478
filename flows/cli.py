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
from ms2rgb.tasks.training.malloc import steady_malloc


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


def _prefect_env() -> None:
    """Prefect settings for the temporary server, unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first start in a fresh clone creates and migrates Prefect's SQLite database; on a busy 2-core
    # machine that once took longer than Prefect's 20 s default, and `make run` failed before any stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _cmd_run(args: argparse.Namespace) -> None:
    _prefect_env()
    from ms2rgb.flows.temporary_server import start_early

    server_ready = start_early()  # comes up while the pipeline's libraries import
    from ms2rgb.tasks.config import load_params

    root = Path(args.root).resolve()
    load_params(root)  # every section checked before the first stage starts
    from ms2rgb.flows.pipeline import pipeline

    if not args.verbose:
        _quiet_prefect_console()
    with project_lock(root, "ms2rgb run", args.wait):
        server_ready()
        reports = pipeline(root=str(root), until=args.until, force=args.force)
    ran = [name for name, report in reports.items() if report is not None]
    print(f"\nstages run: {ran or 'none (all fresh per dvc.lock)'}")
    print("where to look:")
    print(f"  reports:     {root / 'reports'}/<stage>.json")
    print(f"  data docs:   {root / 'reports' / 'validate' / 'data_docs'} (open index.html)")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} (then http://127.0.0.1:5000)")
    page = root / "reports" / "index.html"
    if page.exists():
        print(f"  the report:  {page} (open it in a browser)")


def _cmd_watch(args: argparse.Namespace) -> None:
    import time

    _prefect_env()
    from ms2rgb.tasks.config import load_params

    root = Path(args.root).resolve()
    params = load_params(root)
    cfg = params.landing
    from ms2rgb.flows.deployments import full_name
    from ms2rgb.flows.watch import watch

    if not args.verbose:
        _quiet_prefect_console()
    polls = args.polls or cfg.stable_polls
    for number in range(1, polls + 1):
        summary = watch(root=str(root), wait=args.wait)
        if summary["status"] == "busy" or not summary["settling"] or number == polls:
            break
        time.sleep(args.every)  # let the settling scenes show an unchanged size once more
    for status in ("ingested", "quarantined", "duplicate", "settling", "refused"):
        if summary.get(status):
            print(f"{status:12s} {', '.join(summary[status])}")
    if summary["status"] == "busy":
        print("the project is busy (a retrain or another command holds it): not polled; try again later")
    elif summary["announced"]:
        served = f"a served {full_name(params.tracking.model_prefix, 'retrain')} starts on it"
        alone = "no PREFECT_API_URL, so no served retrain hears it: `ms2rgb run` trains on them now"
        then = served if "PREFECT_API_URL" in os.environ else alone
        print(f"announced {summary['announced']} (ms2rgb.scene.landed): {then}")
    else:
        print(f"nothing new in {cfg.location}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from ms2rgb.flows import serve as serving

    root = Path(args.root).resolve()
    if args.stop:
        stopped = serving.stop(root)
        for name, pid in stopped.items():
            print(f"{name}: {'stopped pid ' + str(pid) if pid else 'was not running'}")
        return
    if args.detach:
        info = serving.detach(root, args.port, ui=not args.no_ui)
        print(f"Prefect API: {info['api_url']} ({'started here' if info['server_started'] else 'PREFECT_API_URL'})")
        print(f"serving {', '.join(info['deployments'])} (pid {info['serve_pid']}); logs in {info['logs']}")
        print(f"UI: {info['api_url'].removesuffix('/api')}   stop: make stop")
        return
    _prefect_env()
    serving.serve(root)


def _cmd_deploy(args: argparse.Namespace) -> None:
    from ms2rgb.flows import work_pool

    _prefect_env()
    root = Path(args.root).resolve()
    info = work_pool.deploy(root)
    print(f"Prefect API: {info['api_url']}")
    print(f"work pool {info['pool']!r} ({work_pool.POOL_TYPE}): {info['pool_state']}")
    print(f"deployed {', '.join(info['deployments'])}; retrain trigger: {info['trigger']}")
    # The worker's Python runs each flow run, so it must be the one that has ms2rgb installed.
    prefect_cli = Path(sys.executable).parent / "prefect"
    print(f"run them: {prefect_cli} worker start --pool {info['pool']}   (or `make worker`)")


def _cmd_stage(args: argparse.Namespace) -> None:
    from ms2rgb.flows.stages import run_stage

    root = Path(args.root).resolve()
    with project_lock(root, f"ms2rgb stage {args.name}", args.wait):
        run_stage(args.name, root)


def _cmd_compare(args: argparse.Namespace) -> None:
    """A grid of the compare section outside DVC (`make compare` runs `full`): reports/compare-<grid>.json."""
    from ms2rgb.flows.stages import write_report
    from ms2rgb.tasks import tracking
    from ms2rgb.tasks.compare import compare
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.errors import ParamsError
    from ms2rgb.tasks.training.loop import make_deterministic, use_device

    root = Path(args.root).resolve()
    params = load_params(root)
    if args.grid not in params.compare.grids:
        raise ParamsError("compare.grids", args.grid, f"choose one of {sorted(params.compare.grids)}")
    make_deterministic(params.threads)
    use_device(params.compute.device)
    lock = project_lock(root, f"ms2rgb compare --grid {args.grid}", args.wait)
    with (
        lock,
        tracking.stage_run(root, params.tracking.experiment, "compare", tags={"ms2rgb.grid": args.grid}) as tracker,
    ):
        report = compare(root, params, tracker, args.grid, staged=False)
        tracker.log_artifact(write_report(root, f"compare-{args.grid}", report))
    print(f"comparison written to {root / 'reports'}/compare-{args.grid}.json and compare-{args.grid}/")


def _cmd_synth(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.data.sources.synth import generate

    params = load_params(Path(args.root))
    with project_lock(Path(args.root), "ms2rgb data synth", args.wait):
        print(f"manifest: {generate(Path(args.out), params.synth, params.seed)}")


def _cmd_eurosat(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.data.sources.eurosat import ingest_eurosat

    fractions = load_params(Path(args.root)).data.eurosat_split_fractions
    with project_lock(Path(args.root), "ms2rgb data eurosat", args.wait):
        frame = ingest_eurosat(
            Path(args.ms), Path(args.out), Path(args.rgb) if args.rgb else None, fractions, seed=args.seed
        )
    print(f"{len(frame)} tiles; manifest: {Path(args.out) / 'manifest.parquet'}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from ms2rgb.flows.dvc_state import track_raw
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.data.sources.radiometry import given_offset
    from ms2rgb.tasks.data.sources.scenes import ingest_scene

    data = load_params(Path(args.root)).data
    scenes_dir = Path(args.root) / data.scenes_dir
    # An option given on the command line beats the params default, and is checked against a product's metadata.
    given = (
        given_offset(args.offset, "option", "--offset")
        if args.offset is not None
        else given_offset(data.radiometric_offset, "param", "data.radiometric_offset")
    )
    scenes = [p if "://" in p else Path(p) for p in args.scene]  # a URL (STAC item) stays a string
    with project_lock(Path(args.root), "ms2rgb data ingest", args.wait):
        frame = ingest_scene(
            scenes, scenes_dir, scene_id=args.scene_id, max_cloud_share=data.max_cloud_share, radiometry=given
        )
        tracked = track_raw(Path(args.root), scenes_dir / frame["path"].iloc[0].split("/")[0])
    print(f"{len(frame)} tiles added to the MS pool under {scenes_dir}; the next run re-prepares the data")
    if tracked is not None:
        print(f"versioned by DVC: commit {tracked.name} to git, `dvc push` to share the scene")


def _cmd_masks(args: argparse.Namespace) -> None:
    from ms2rgb.flows.dvc_state import track_raw
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.data.sources.mask_folder import IMPORT_DIR, import_masks

    params = load_params(Path(args.root))
    seg = params.data.segmentation
    out = Path(args.out) if args.out else Path(args.root) / seg.folder
    with project_lock(Path(args.root), "ms2rgb data masks", args.wait):
        # validate's own limit: the import leaves out what validation would stop the run on
        done = import_masks(
            Path(args.images),
            Path(args.masks),
            Path(args.legend),
            out,
            max_ignore_share=params.validation.max_ignore_share,
        )
        tracked = track_raw(Path(args.root), out / IMPORT_DIR)
    images = done.manifest["location_id"].nunique()
    hint = "" if seg.source == "folder" else "; set data.segmentation.source: folder to train the detector on them"
    print(f"{len(done.manifest)} tiles of {images} images written to {out / IMPORT_DIR}{hint}")
    print(f"tiles left out: {done.left_out.describe(done.max_ignore_share)}")
    if tracked is not None:
        print(f"versioned by DVC: commit {tracked.name} to git, `dvc push` to share the tiles")


RESAMPLE_HELP = (
    "when the image's pixel size is more than 10%% off the model's training pixel size (10 m), resample it "
    "on the fly to that size (average when finer, bilinear when coarser) instead of stopping; outputs are on "
    "the resampled grid"
)


def _cmd_detect(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.detection.detect import detect

    result = detect(
        Path(args.image),
        args.classes,
        Path(args.out),
        root=Path(args.root),
        model_uri=args.model,
        stride=args.stride,
        resample=args.resample,
        min_area_px=args.min_area,
        gpkg=args.gpkg,
    )
    print(f"model: {result['model']}")
    if result.get("model_note"):
        print(f"note: {result['model_note']}")
    if result["resampled"]:
        print(f"input: {result['resampled']}")
    print(f"polygons: {result['polygons']}")
    print("class shares: " + ", ".join(f"{name} {share:.1%}" for name, share in result["shares"].items()))
    for kind, path in result["outputs"].items():
        print(f"{kind:16s} {path}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.prediction.scene_map import predict

    result = predict(
        Path(args.image), Path(args.out), root=Path(args.root), model_uri=args.model, resample=args.resample
    )
    print(f"model: {result['model']}")
    if result["model_note"]:
        print(f"note: {result['model_note']}")
    if result["resampled"]:
        print(f"input: {result['resampled']}")
    grid = result["grid"]
    print(f"grid: {grid['rows']} x {grid['cols']} cells of {grid['cell_px']} px ({grid['nodata_cells']} without data)")
    shares = sorted(result["shares"].items(), key=lambda item: -item[1])
    print("class shares: " + ", ".join(f"{name} {share:.1%}" for name, share in shares if share > 0))
    for kind, path in result["outputs"].items():
        print(f"{kind:18s} {path}")


def _cmd_promote(args: argparse.Namespace) -> None:
    from ms2rgb.tasks.config import load_params
    from ms2rgb.tasks.evaluate import promote_by_hand

    root = Path(args.root).resolve()
    params = load_params(root)
    with project_lock(root, f"ms2rgb promote {args.model} {args.version}", args.wait):
        decision = promote_by_hand(root, params, args.model, args.version, args.force)
    print(f"{args.model}: {decision.decision}; champion is v{decision.champion}")
    for reason in decision.reasons:
        print(f"  - {reason}")


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
    serve = sub.add_parser(
        "serve",
        help="serve the deployments pipeline/<prefix>-default, watch/<prefix>-landing, retrain/<prefix>-on-new-scenes "
        "(prefix: params tracking.model_prefix; blocks)",
    )
    serve.add_argument(
        "--detach",
        action="store_true",
        help="start a local Prefect server if PREFECT_API_URL is unset, then serve in the background (`make serve`)",
    )
    serve.add_argument("--stop", action="store_true", help="stop what --detach started (what `make stop` runs)")
    serve.add_argument("--port", type=int, default=4200, help="port of the local server --detach starts (default 4200)")
    serve.add_argument("--no-ui", action="store_true", help="start the local server without its web UI")
    serve.set_defaults(func=_cmd_serve)
    deploy = sub.add_parser(
        "deploy",
        help="register prefect.yaml's deployments on its process work pool (created if missing) and the retrain "
        "trigger with the server at PREFECT_API_URL (`make deploy`); workers run them",
    )
    deploy.set_defaults(func=_cmd_deploy)
    watch = sub.add_parser("watch", help="poll the landing location: ingest new scenes, quarantine bad ones")
    watch.add_argument(
        "--polls", type=int, default=0, help="polls at most, until nothing is settling (default: landing.stable_polls)"
    )
    watch.add_argument("--every", type=float, default=5.0, help="seconds between polls (default 5)")
    watch.set_defaults(func=_cmd_watch)
    stage = sub.add_parser("stage", help="run one stage without Prefect (what dvc.yaml calls)")
    stage.add_argument("name")
    stage.set_defaults(func=_cmd_stage)
    comp = sub.add_parser("compare", help="method A against its baselines on a grid of params.yaml's compare.grids")
    comp.add_argument("--grid", default="full", help="entry of compare.grids (default: full)")
    comp.set_defaults(func=_cmd_compare)
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
    ingest = data.add_parser(
        "ingest", help="add a Sentinel-2 scene (GeoTIFF, per-band JP2/TIF, .SAFE, zip or STAC item) to the MS pool"
    )
    ingest.add_argument(
        "scene",
        nargs="+",
        help="one 13-band GeoTIFF, the per-band files of one scene, or one product: a .SAFE folder, its zip, "
        "a STAC item (.json or URL)",
    )
    ingest.add_argument("--scene-id", help="name of the scene folder (default: the product's or the files' name)")
    ingest.add_argument(
        "--offset",
        type=int,
        help="DN offset of bare band files, e.g. -1000 for processing baseline 04.00+ (Jan 2022 on); "
        "default: params data.radiometric_offset; products bring their own",
    )
    ingest.set_defaults(func=_cmd_ingest)
    masks = data.add_parser("masks", help="the detector's tiles from your own images and masks (legend.yaml)")
    masks.add_argument("--images", required=True, help="folder of RGB images (GeoTIFF, PNG, JPEG)")
    masks.add_argument("--masks", required=True, help="folder of masks named like the images: ids, colours or GeoJSON")
    masks.add_argument(
        "--legend", required=True, help="legend yaml: class ids/colours/values -> names and descriptions"
    )
    masks.add_argument(
        "--out", help="folder whose imported/ subfolder gets the tiles (default: params data.segmentation.folder)"
    )
    masks.set_defaults(func=_cmd_masks)
    promote = sub.add_parser("promote", help="make a registered version the champion if it beats the current one")
    promote.add_argument(
        "model", help="registered model: <prefix>-<stage>, e.g. ms2rgb-student (prefix: params tracking.model_prefix)"
    )
    promote.add_argument("version", type=int, help="its version number")
    promote.add_argument("--force", action="store_true", help="skip the check (recorded as 'forced')")
    promote.set_defaults(func=_cmd_promote)
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
    det.add_argument(
        "--model",
        help="MLflow model URI, e.g. models:/ms2rgb-detector/1, or 'artifacts' for artifacts/detector/ "
        "(default: models:/<prefix>-detector@champion, prefix: params tracking.model_prefix; artifacts/detector/ "
        "only when there is no MLflow store)",
    )
    det.add_argument(
        "--stride", type=int, default=32, help="window step in px; < 64 overlaps and averages (default 32)"
    )
    det.add_argument("--resample", action="store_true", help=RESAMPLE_HELP)
    det.add_argument(
        "--min-area",
        type=int,
        default=1,
        help="sieve away regions of fewer pixels (of the class map) from the map and polygons (default 1: keep all)",
    )
    det.add_argument("--gpkg", action="store_true", help="also write the polygons as <stem>_classes.gpkg (image CRS)")
    det.set_defaults(func=_cmd_detect)
    pred = sub.add_parser(
        "predict", help="scene-class map (one class per 64-px cell) of an RGB (or 13-band MS) GeoTIFF with the student"
    )
    pred.add_argument("image", help="GeoTIFF: 3-band uint8 RGB or 13-band uint16 Sentinel-2, any size, with a CRS")
    pred.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    pred.add_argument(
        "--model",
        help="MLflow model URI, e.g. models:/ms2rgb-student/3, or 'artifacts' for artifacts/student/model.pt "
        "(default: models:/<prefix>-student@champion, prefix: params tracking.model_prefix; "
        "artifacts/student/model.pt only when there is no MLflow store)",
    )
    pred.add_argument("--resample", action="store_true", help=RESAMPLE_HELP)
    pred.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steady_malloc()  # before any training, in this process and every process it starts
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
