"""The registry side of a stage's outputs: versions it registered, made visible only when it succeeds.

A stage registers its models while it runs (it reports their version numbers), but their outputs
are swapped in by the stage runner only after the stage returned. So the `challenger` alias waits
here and is set when the stage run closes without an error (`commit`, after the swap); a stage that
raises instead has every version it registered deleted again, and every registered model it
created removed (`roll_back`), so the registry reads as before the run. A run killed outright
(SIGKILL) can roll nothing back: its versions stay, without an alias, like its `.partial` folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHALLENGER = "challenger"  # the alias every newly registered version gets once its stage succeeded


@dataclass
class PendingVersions:
    """Model versions registered by one stage run (and its child runs), in registration order."""

    versions: list[tuple[str, int]] = field(default_factory=list)  # (registered model, version)
    created: set[str] = field(default_factory=set)  # registered models that did not exist before this run

    def note_model(self, client: MlflowClient, name: str) -> None:
        """Call before registering into `name`: remembers whether this run creates the registered model."""
        if name in self.created or any(n == name for n, _ in self.versions):
            return
        try:
            client.get_registered_model(name)
        except MlflowException:  # RESOURCE_DOES_NOT_EXIST: the log_model call about to run creates it
            self.created.add(name)

    def add(self, name: str, version: int) -> None:
        self.versions.append((name, version))

    def commit(self, client: MlflowClient) -> None:
        """Point `challenger` at each registered version (a later version of one model wins)."""
        for name, version in self.versions:
            client.set_registered_model_alias(name, CHALLENGER, str(version))
        self.versions.clear()
        self.created.clear()

    def roll_back(self, client: MlflowClient) -> None:
        """Delete the versions this run registered, and the registered models it created.

        Never raises: it runs while the stage's own error propagates, which must stay the one shown;
        a version that could not be deleted is named on stderr.
        """
        for name, version in reversed(self.versions):
            try:
                client.delete_model_version(name, str(version))
            except Exception as err:  # whatever the store raises, the stage's own error comes first
                print(f"registry: {name} v{version} of a failed run could not be deleted: {err}", file=sys.stderr)
        for name in sorted(self.created):
            try:
                if not client.search_model_versions(f"name='{name}'"):
                    client.delete_registered_model(name)
            except Exception as err:
                print(f"registry: {name}, created by a failed run, could not be deleted: {err}", file=sys.stderr)
        self.versions.clear()
        self.created.clear()
