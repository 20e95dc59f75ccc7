"""The recipe's `tracking:` block (MLflow, Weights & Biases, or any registered backend) and the rule
that keeps credentials out of recipes.

    tracking:
      mlflow: {tracking_uri: http://mlflow.internal:5000, experiment: chla}
      wandb: {project: chla, entity: my-team, mode: offline}

Each key of the block selects a tracking backend of the registry (`tracking_backends()`): its
settings model, which the launcher validates, and its job-side tracker, an import path
("module:Class") that only the jobs import (chla_train.tracking: the built-in MlflowTracker and
WandbTracker import their clients only when a stage starts tracking). A backend defined elsewhere
joins through an entry point of the group `chla.tracking` naming its TrackingBackend, or through
`register_tracking_backend()` in the process that loads the recipe. No module chooses a backend
by name.

Credentials never come from the recipe: run directories are readable by the project's group and
the frozen recipe is a file in them. The clients read their own environment variables
(WANDB_API_KEY; MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD),
which Slurm passes on to the jobs. A recipe value under a key that names a credential, or a URL
with a password in it, is refused with one line.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from .errors import KeyPath, RecipeError

# Keys whose values are credentials. Lower-case names only match whole: `pad_token` and
# `max_new_tokens` are recipe keys, `HF_TOKEN` (an environment variable's name) is a secret.
SECRET_NAMES = {
    "api_key",
    "apikey",
    "token",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "secret_key",
    "private_key",
    "access_token",
    "auth_token",
    "refresh_token",
}
SECRET_SUFFIXES = (
    "_api_key",
    "_apikey",
    "_password",
    "_passwd",
    "_secret",
    "_secret_key",
    "_private_key",
    "_access_token",
    "_auth_token",
)
# A scheme starts where no scheme character precedes it, and is at most 32 long: without the
# lookbehind, a search over 100,000 letters took 28 s (a try from every letter to the end).
_URL_WITH_PASSWORD = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^/\s@:]+:[^/\s@]+@")
_CREDENTIALS_HINT = (
    "credentials come from the environment (WANDB_API_KEY; MLFLOW_TRACKING_TOKEN or "
    "MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD), never from the recipe: run "
    "directories are readable by the project's group"
)


def looks_like_a_credential(key: str) -> bool:
    normal = key.lower().replace("-", "_")
    return normal in SECRET_NAMES or normal.endswith(SECRET_SUFFIXES) or (key.isupper() and normal.endswith("_token"))


def refuse_credentials(data: Any, source: str, line_of: Callable[[KeyPath], int | None], path: KeyPath = ()) -> None:
    """Raise a RecipeError naming the first key that holds a credential (`line_of(path)` gives
    the YAML line of a key path)."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = path + (key,)
            if isinstance(key, str) and looks_like_a_credential(key) and value not in (None, ""):
                raise RecipeError(
                    f"{key!r} looks like a credential; {_CREDENTIALS_HINT}",
                    file=source,
                    key=".".join(map(str, here)),
                    line=line_of(here),
                )
            refuse_credentials(value, source, line_of, here)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            refuse_credentials(value, source, line_of, path + (index,))
    elif isinstance(data, str) and _URL_WITH_PASSWORD.search(data):
        raise RecipeError(
            f"a URL with a password in it; {_CREDENTIALS_HINT}",
            file=source,
            key=".".join(map(str, path)) or None,
            line=line_of(path),
        )


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlflowSettings(_Settings):
    tracking_uri: str = Field(description="http(s)://host:port of an MLflow server, or file:/sqlite: URIs")
    experiment: str = Field("chla", description="experiment name (created if missing)")

    @field_validator("tracking_uri")
    @classmethod
    def _a_uri(cls, value: str) -> str:
        if not re.match(r"^(https?|file|sqlite|postgresql|mysql|databricks)[:+]", value) and not value.startswith("/"):
            raise ValueError(f"{value!r} is not a tracking URI; e.g. http://mlflow.internal:5000 or file:///path")
        return value


class WandbSettings(_Settings):
    project: str
    entity: str | None = None
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: no network, run files under `dir` (`wandb sync` them later)"
    )
    dir: str | None = Field(None, description="where W&B writes its files (default: each stage's work dir)")


@dataclass(frozen=True)
class TrackingBackend:
    """One experiment tracker that a recipe's `tracking:` block may select."""

    key: str  # its key in the `tracking:` block
    settings: type[BaseModel]  # validated by the launcher; extra keys should be refused
    # "module:Class" of its job-side tracker (a chla_train.tracking.Tracker), imported in the jobs only.
    tracker: str


BUILT_IN = (
    TrackingBackend("mlflow", MlflowSettings, "chla_train.tracking:MlflowTracker"),
    TrackingBackend("wandb", WandbSettings, "chla_train.tracking:WandbTracker"),
)
ENTRY_POINT_GROUP = "chla.tracking"
# Backends given to register_tracking_backend() in this process, by key.
_registered: dict[str, TrackingBackend] = {}


@lru_cache(maxsize=1)
def tracking_backends() -> dict[str, TrackingBackend]:
    """Every backend by key: the built-in ones, the `chla.tracking` entry points of the installed
    distributions, then those registered in this process."""
    found = [(backend, f"chla_launcher.contract.tracking_settings.BUILT_IN[{n}]") for n, backend in enumerate(BUILT_IN)]
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.append((entry.load(), f"entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP})"))
    found += [(backend, f"register_tracking_backend({key!r})") for key, backend in _registered.items()]
    backends: dict[str, TrackingBackend] = {}
    for backend, where in found:
        if not isinstance(backend, TrackingBackend):
            raise RuntimeError(f"{where} is not a chla_launcher.contract.tracking_settings.TrackingBackend")
        if backend.key in backends:
            raise RuntimeError(f"tracking backend {backend.key!r} is defined twice ({where})")
        backends[backend.key] = backend
    return backends


def register_tracking_backend(backend: TrackingBackend) -> TrackingBackend:
    """Add a backend defined outside chla to this process's registry. The jobs run in other
    processes: a backend a submitted chain uses is found there through an entry point of the group
    `chla.tracking` instead."""
    if backend.key in tracking_backends() and tracking_backends()[backend.key] is not backend:
        raise ValueError(f"tracking backend {backend.key!r} is defined already")
    _registered[backend.key] = backend
    tracking_backends.cache_clear()
    return backend


class TrackingSettings(_Settings):
    """The `tracking:` block: each key a backend of the registry, each value its settings."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _backend_settings(cls, data: Any, handler: Callable[[Any], TrackingSettings]) -> TrackingSettings:
        """Each key validated by its backend's settings model; pydantic's errors keep their place
        below the key (the recipe's error names the line of tracking.mlflow.tracking_uri)."""
        if not isinstance(data, dict):
            return handler(data)
        backends, errors, selected = tracking_backends(), [], {}
        for key, value in data.items():
            if value is None:  # `wandb: null`: not selected
                continue
            if key not in backends:
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=value))
                continue
            try:
                selected[key] = backends[key].settings.model_validate(value)
            except ValidationError as error:
                errors += [
                    InitErrorDetails(type=e["type"], loc=(key, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
                    for e in error.errors()
                ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return handler(selected)

    def selected(self) -> list[tuple[TrackingBackend, BaseModel]]:
        """The backends the block selects, in its order, each with its validated settings."""
        backends = tracking_backends()
        return [(backends[key], settings) for key, settings in (self.model_extra or {}).items()]
