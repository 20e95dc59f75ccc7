"""The recipe's `tracking:` block (MLflow, Weights & Biases) and the rule that keeps credentials out
of recipes.

    tracking:
      mlflow: {tracking_uri: http://mlflow.internal:5000, experiment: chla}
      wandb: {project: chla, entity: my-team, mode: offline}

What gets tracked and how is chla_train.tracking's business (it runs in the jobs); this module
only declares the settings, so that the launcher validates them without importing either client.

Credentials never come from the recipe: run directories are readable by the project's group and
the frozen recipe is a file in them. The clients read their own environment variables
(WANDB_API_KEY; MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD),
which Slurm passes on to the jobs. A recipe value under a key that names a credential, or a URL
with a password in it, is refused with one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class TrackingSettings(_Settings):
    mlflow: MlflowSettings | None = None
    wandb: WandbSettings | None = None
