"""Which model a reading command (`ms2rgb predict`, `ms2rgb detect`) uses, with no silent fallback.

- `--model models:/NAME/VERSION` (or `@ALIAS`): that registered model.
- `--model artifacts`: the stage's own model file under artifacts/, the registry untouched.
- no `--model`: the registered champion of the project's model, `<tracking.model_prefix>-<kind>` in its
  params.yaml (registered_name). Only when there is no tracking store at all (no
  MLFLOW_TRACKING_URI and no mlflow.db in the project, e.g. a copy without the store) is the stage's
  file used instead, and the result says so. Any other failure to load the champion (an unreachable
  server, no champion alias yet, a broken version) stops with one line naming the store and the fixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ms2rgb.tasks import tracking
from ms2rgb.tasks.data.artifacts import LOCAL_MODEL as LOCAL_MODEL  # re-exported: the value this module offers
from ms2rgb.tasks.errors import Ms2rgbError

if TYPE_CHECKING:
    import torch

    from ms2rgb.tasks.config import ModelKind


def store_uri(root: Path) -> str:
    """The tracking store a reading command looks in: MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return tracking._user_uri() or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def has_store(root: Path) -> bool:
    """Whether there is a tracking store to read (a user's URI, or the project's mlflow.db)."""
    return tracking._has_store(root)


def registered_name(root: Path, kind: ModelKind) -> str:
    """The project's registered model of `kind`: `<tracking.model_prefix>-<kind>` from its params.yaml."""
    from ms2rgb.tasks.config import load_params, model_name

    return model_name(load_params(root).tracking.model_prefix, kind)


def name_hint(root: Path, kind: ModelKind) -> str:
    """registered_name for an error's fix; the pattern when params.yaml cannot be read (the error being
    reported is the one that matters, not a missing params.yaml)."""
    try:
        return registered_name(root, kind)
    except Ms2rgbError:
        return f"<tracking.model_prefix>-{kind}"


def _reason(err: BaseException, uri: str, store: str) -> str:
    """The error's message on one line, without its own fix and without repeating `uri` or `store`."""
    text = " ".join(str(err).split()).split(". Fix:")[0]
    for said in (f"{uri} could not be loaded: ", f"MLFLOW_TRACKING_URI={store}: "):
        text = text.removeprefix(said)
    text = text.rstrip(".") or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def load_champion(root: Path, name: str, local: Path) -> torch.nn.Module:
    """models:/NAME@champion from the project's store, or one line naming the store and the fixes.

    `local` is the stage's model file that `--model artifacts` would read; the message offers it,
    but nothing here falls back to it.
    """
    uri = f"models:/{name}@{tracking.CHAMPION}"
    try:
        return tracking.load_registered_module(root, uri)
    except tracking.TrackingUnreachable as err:
        fix = (
            "start that server (`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI "
            "to use the project's own store"
        )
        error: BaseException = err
    except Exception as err:  # no alias yet, no such model, a version that does not load: all say so
        fix = (
            "run the pipeline through the evaluate stage (`ms2rgb run`), which makes a version champion, "
            f"or name one with --model models:/{name}/<version>"
        )
        error = err
    store = store_uri(root)
    raise Ms2rgbError(
        f"{uri} could not be loaded from the MLflow store {store}: {_reason(error, uri, store)}. "
        f"Fix: {fix}; or pass --model {LOCAL_MODEL} to use {local}"
    ) from error
