"""The appliance's one exception tree.

Each class carries the HTTP status, the OpenAI error ``type`` and ``code`` it maps to; the API
layer (``appliance.api.error_handlers``) turns any of them into the OpenAI error envelope in one
place. Code below the API raises these and never chooses status codes itself.
"""

from __future__ import annotations

from typing import Any


def envelope(
    message: str, error_type: str, code: str | int | None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class ConfigError(ApplianceError):
    """The configuration (models.yaml, settings, engine settings) is invalid."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_config"


class InvalidRequestError(ApplianceError):
    """The client's request is malformed or asks for something impossible."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLargeError(InvalidRequestError):
    """The request body is over the configured limit."""

    status_code = 413
    code = "body_too_large"


class BodyTimeoutError(InvalidRequestError):
    """The client stopped sending its request body part-way."""

    status_code = 408
    code = "body_timeout"


class UnsupportedMediaTypeError(InvalidRequestError):
    """A POST body that is not declared as JSON (what a cross-site form or fetch sends)."""

    status_code = 415
    code = "unsupported_media_type"


class HostNotAllowedError(InvalidRequestError):
    """The Host header names a host the appliance does not answer to (DNS rebinding)."""

    code = "host_not_allowed"


class AuthenticationError(ApplianceError):
    """No API key, or a wrong one."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ApplianceError):
    """The key is valid but may not do this (admin route, disallowed model)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class CrossOriginError(PermissionDeniedError):
    """A request from a web page of an origin that is not allowed (CORS is off by default)."""

    code = "cross_origin_refused"


class ModelNotAllowedError(PermissionDeniedError):
    """The key is valid but may not use this model."""

    code = "model_not_allowed"


class ModelNotFoundError(ApplianceError):
    """No model of that name in the catalogue."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class WrongTaskError(InvalidRequestError):
    """The model exists but does not do this (chat on an embedding model, say)."""

    code = "unsupported_task"


class RateLimitedError(ApplianceError):
    """Too many requests for this key or this model's queue; retry later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"


class QuotaExceededError(RateLimitedError):
    """The key used up its token quota for the day or month; retry after the reset."""

    error_type = "insufficient_quota"
    code = "insufficient_quota"


class ModelNotReadyError(ApplianceError):
    """The model exists but cannot serve now (unloaded, loading, draining, failed)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "model_not_ready"


class ModelUnloadedError(ModelNotReadyError):
    """The model is in the catalogue but not loaded, and does not load on demand."""

    code = "model_unloaded"


class ModelLoadingError(ModelNotReadyError):
    """The model is still loading after the bounded wait."""

    code = "model_loading"


class ModelDownloadingError(ModelNotReadyError):
    """The model's files are still downloading; Retry-After says when they should be done."""

    code = "model_downloading"


class ModelDownloadFailedError(ModelNotReadyError):
    """The model's files could not be downloaded (gated, gone, no disk, hub unreachable)."""

    code = "download_failed"


class ModelDrainingError(ModelNotReadyError):
    """The model is being unloaded; it takes no new requests."""

    code = "model_draining"


class ModelFailedError(ModelNotReadyError):
    """The model's engine failed; the supervisor may be restarting it."""

    code = "model_failed"


class EvictionTooSoonError(ModelNotReadyError):
    """A load needs room that only models loaded moments ago hold; they stay a while first."""

    code = "eviction_too_soon"


class LifecycleError(ApplianceError):
    """An operator's lifecycle request cannot be done in the model's current state."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "invalid_state"


class InsufficientResourcesError(ApplianceError):
    """A model does not fit on the devices that are free."""

    status_code = 507
    error_type = "insufficient_resources"
    code = "insufficient_resources"


class NotSupportedError(ApplianceError):
    """The platform lacks this feature (sleep mode on CPU, say)."""

    status_code = 501
    error_type = "not_supported"
    code = "not_supported"


class BackendError(ApplianceError):
    """A remote backend failed or answered garbage."""

    status_code = 502
    error_type = "backend_error"
    code = "backend_error"


class BackendUnavailableError(BackendError):
    """A remote backend cannot be reached, or its circuit breaker is open."""

    status_code = 503
    code = "backend_unavailable"


class BackendTimeoutError(BackendError):
    """A remote backend did not answer in time."""

    status_code = 504
    code = "backend_timeout"


class EngineError(ApplianceError):
    """A local engine failed while serving a request."""

    status_code = 503
    error_type = "service_unavailable"
    code = "engine_error"


class DeviceReleaseError(EngineError):
    """A stopped engine's processes or GPU memory did not go away in time."""

    code = "device_release_timeout"


class OwnerUnavailableError(ApplianceError):
    """An HTTP worker could not get an answer from the process that owns the model table."""

    status_code = 503
    error_type = "service_unavailable"
    code = "owner_unavailable"


class PullRefusedError(InvalidRequestError):
    """A model pull cannot start: not a hub id, a local source, gated, missing, no disk."""

    code = "pull_refused"


class NotFoundError(ApplianceError):
    """No such object for this caller (a file or batch of another key is not found either)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"
