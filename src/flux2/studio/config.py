"""The studio service's settings: the one source of its defaults. `flux2 serve` options and `FLUX2_STUDIO_*`
environment variables both land here, so a default lives in exactly one place.

Built where it is used (the CLI, the app factory, a test), never at import time.
"""

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
# The studio front end in development: Vite (5173, as localhost or 127.0.0.1) and the CRA/Next port (3000).
FRONT_END_ORIGINS = ("http://localhost:5173", "http://127.0.0.1:5173", "http://localhost:3000")


class StudioSettings(BaseSettings):
    """Settings of `flux2 serve`; each field can be set as `FLUX2_STUDIO_<FIELD>` in the environment.

    Invalid values raise pydantic's `ValidationError`, which names the field, the value and the rule.
    """

    model_config = SettingsConfigDict(env_prefix="FLUX2_STUDIO_", validate_default=True)

    host: str = Field("127.0.0.1", min_length=1)  # loopback: exposing the service is an explicit choice
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (tests)
    data_dir: Path = Path("studio-data")  # the database (by default) and every media file live here
    database_url: str | None = None  # None: SQLite in the data folder (see `db_url`)
    model: str = Field("flux.2-klein-4b", min_length=1)  # checked against the registry when the worker loads it
    device: str | None = None  # None: CUDA, then MPS, then CPU
    # Browser origins allowed to call the service: by default the studio front end's local dev servers. Given
    # origins replace these ("*" only when given); environment: a JSON list or comma-separated origins.
    cors_origins: Annotated[list[str], NoDecode] = list(FRONT_END_ORIGINS)
    api_token: str | None = None  # when set, requests must send `Authorization: Bearer <token>`
    segmentation_url: str = Field("http://127.0.0.1:8001", pattern=r"^https?://")  # the SAM service
    segmentation_timeout_s: float = Field(30.0, gt=0)
    max_upload_bytes: int = Field(25 * MiB, gt=0)
    sse_queue_size: int = Field(100, ge=1)  # events kept per client; the oldest is dropped when full
    sse_keepalive_s: float = Field(15.0, gt=0)
    # Prompt enhancement (a request's `enhance_prompt`), as `flux2 generate --upsample`: "none" turns it off;
    # "local" runs a chat model here (default: [dev]'s own Mistral encoder, else Mistral-Small 3.2); "openrouter"
    # asks an OpenAI-compatible API, with the key from $OPENROUTER_API_KEY (never a setting: it would be logged).
    upsample: Literal["none", "local", "openrouter"] = "none"
    upsample_model: str | None = None  # local: a model folder or Hub id; openrouter: the API's model name
    upsample_url: str | None = Field(None, pattern=r"^https?://")  # openrouter: the API's base URL
    # Speed and memory, as `flux2 generate`'s options (flux2.transforms.acceleration: defaults, help, checks).
    threads: int | None = Field(None, ge=1)
    compile: bool = False
    attention: str = "auto"
    step_cache: float = Field(0.0, ge=0, le=1)
    block_offload: bool = False
    fp8: str = "off"
    offload_text_encoder: bool = False
    tiled_decode: str = "auto"
    memory_report: bool = False
    # With a PostgreSQL database_url, jobs run in `flux2 worker` processes (flux2.studio.distributed): a worker
    # renews the lease of its job every heartbeat_s; a job whose lease is older than stall_timeout_s is swept
    # back to the queue (its worker is presumed dead), at most until it was started max_attempts times.
    # The model split over `gpus` processes, one GPU each (flux2.parallel): CFG halves and sequence slices, or with
    # tensor_parallel its weights sharded (for [dev] on cards it does not fit). Not with upsampling.
    gpus: int = Field(1, ge=1)
    tensor_parallel: bool = False
    heartbeat_s: float = Field(2.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @field_validator("database_url", "api_token", "device", "upsample_model", "upsample_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _split_model_alone(self) -> "StudioSettings":
        if (self.gpus > 1 or self.tensor_parallel) and self.upsample != "none":
            raise ValueError("gpus > 1 cannot be combined with upsample: each device would rewrite the prompt")
        speed = ("compile", "step_cache", "block_offload", "fp8", "offload_text_encoder", "attention")
        if self.gpus > 1 and (
            changed := [name for name in speed if getattr(self, name) not in (False, 0, "off", "auto")]
        ):
            raise ValueError(f"gpus > 1 cannot be combined with {', '.join(changed)} yet")
        if self.tensor_parallel and self.gpus < 2:
            raise ValueError(f"tensor_parallel needs gpus of 2 or more, got {self.gpus}")
        return self

    @model_validator(mode="after")
    def _lease_can_miss_a_beat(self) -> "StudioSettings":
        if self.stall_timeout_s < 3 * self.heartbeat_s:
            raise ValueError(f"stall_timeout_s must be at least 3 x heartbeat_s ({3 * self.heartbeat_s} s), got "
                             f"{self.stall_timeout_s} s: a busy worker would lose its job")  # fmt: skip
        return self

    def acceleration(self):
        from flux2.transforms.acceleration import Acceleration, acceleration_fields

        return Acceleration(**{name: getattr(self, name) for name in acceleration_fields()}).check()

    @property
    def db_url(self) -> str:
        """The database URL: `database_url`, or SQLite at `{data_dir}/studio.db`."""
        return self.database_url or f"sqlite:///{self.data_dir / 'studio.db'}"
