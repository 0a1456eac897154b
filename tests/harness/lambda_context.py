"""A stand-in for the context object AWS Lambda passes to a Python handler."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

# Lambda's default function timeout.
DEFAULT_TIMEOUT_SECONDS = 3.0


@dataclass
class LambdaContext:
    """The attributes and method of Lambda's Python context object that handlers use."""

    function_name: str = "record-event"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 128
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    _deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))
