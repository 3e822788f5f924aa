"""Which of ``vllm serve``'s routes the appliance mounts, and how each is answered.

The list was taken from vLLM 0.32's own registration (``register_api_routers`` in
``vllm/entrypoints/launchers/api_server/routers.py`` and the routers it includes), and
``tests/unit/test_route_table.py`` checks it against the app vLLM builds, so that a route vLLM
adds or drops in a later release is noticed. Pure data: the auth middleware, the routes and the
README's list all read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRoute:
    """A route whose JSON body names a ``model``: answered by that model's engine."""

    path: str
    summary: str
    method: str = "POST"

    @property
    def key(self) -> str:
        """``"POST /tokenize"``: how engines list the routes they serve."""
        return f"{self.method} {self.path}"


# Served by the appliance's own OpenAI routes (appliance/api/openai_routes.py), listed here so
# that the full set of model routes is in one place.
OPENAI_ROUTES: tuple[ModelRoute, ...] = (
    ModelRoute("/v1/chat/completions", "Chat completion"),
    ModelRoute("/v1/completions", "Text completion"),
    ModelRoute("/v1/embeddings", "Embeddings"),
)

# Answered by the model's engine as ``vllm serve`` answers them (appliance/api/vllm_routes.py).
ENGINE_ROUTES: tuple[ModelRoute, ...] = (
    ModelRoute("/v1/responses", "Responses API"),
    ModelRoute("/v1/responses/render", "Responses API: the prompt it would run"),
    ModelRoute("/v1/messages", "Anthropic Messages API"),
    ModelRoute("/v1/messages/count_tokens", "Anthropic Messages API: count tokens"),
    ModelRoute("/v1/messages/render", "Anthropic Messages API: the prompt it would run"),
    ModelRoute("/v1/chat/completions/batch", "Several chat completions in one request"),
    ModelRoute("/v1/chat/completions/render", "Chat completion: the prompt it would run"),
    ModelRoute("/v1/chat/completions/derender", "Chat completion: token ids to text"),
    ModelRoute("/v1/completions/render", "Text completion: the prompt it would run"),
    ModelRoute("/v1/completions/derender", "Text completion: token ids to text"),
    ModelRoute("/v1/systemone", "Structured decisions"),
    ModelRoute("/generative_scoring", "Generative scoring"),
    ModelRoute("/inference/v1/generate", "Token ids in, token ids out"),
    ModelRoute("/tokenize", "Tokenize"),
    ModelRoute("/detokenize", "Detokenize"),
    ModelRoute("/pooling", "Pooling (raw pooler output)"),
    ModelRoute("/classify", "Classification"),
    ModelRoute("/v2/embed", "Embeddings, Cohere v2 style"),
    ModelRoute("/score", "Score pairs of texts"),
    ModelRoute("/v1/score", "Score pairs of texts (older path)"),
    ModelRoute("/rerank", "Rerank documents"),
    ModelRoute("/v1/rerank", "Rerank documents (Jina style path)"),
    ModelRoute("/v2/rerank", "Rerank documents (Cohere style path)"),
)

MODEL_ROUTES: tuple[ModelRoute, ...] = OPENAI_ROUTES + ENGINE_ROUTES

# Routes whose ``model`` vLLM takes as optional (one model per ``vllm serve``) and that clients
# written for ``vllm serve`` call without one (lm-evaluation-harness's remote tokenizer): a
# body that names none goes to the one model the caller may use (``api.default_model``).
MODEL_OPTIONAL_PATHS = frozenset({"/tokenize", "/detokenize"})

# Routes about a stored response: no ``model`` in them, so every engine that may hold the
# response is asked in turn.
RESPONSE_ID_ROUTES: tuple[ModelRoute, ...] = (
    ModelRoute("/v1/responses/{response_id}", "Retrieve a stored response", "GET"),
    ModelRoute("/v1/responses/{response_id}/cancel", "Cancel a background response"),
)

VERSION_PATH = "/version"

# Routes vLLM registers only when an engine setting asks for them (``vllm serve --flag``),
# with that setting. They name no model in a body: the query's ``model`` does, or else the one
# model the caller may use that has the setting (as ``vllm serve``, one model, answers).
TOKENIZER_INFO = ModelRoute("/tokenizer_info", "Tokenizer configuration and chat template", "GET")
OPTIONAL_ROUTES: dict[ModelRoute, str] = {TOKENIZER_INFO: "enable_tokenizer_info_endpoint"}


def route_enabled(engine: dict[str, object], route: ModelRoute) -> bool:
    """Whether ``engine`` (a local entry's ``engine:`` settings) turns on ``route`` of
    ``OPTIONAL_ROUTES``. Asked of the entry, not of vLLM's app: vLLM adds such a route to a
    module-level router, so every app it builds later in the same process has it too."""
    setting = OPTIONAL_ROUTES[route]
    given = {key.replace("-", "_"): value for key, value in engine.items()}
    return given.get(setting) is True


# vLLM routes the appliance does not mount, each with the reason (the README lists them).
NOT_MOUNTED: dict[str, str] = {
    "/v1/audio/transcriptions": "multipart upload; not mounted yet (no speech model tested)",
    "/v1/audio/translations": "multipart upload; not mounted yet (no speech model tested)",
    "/invocations": "SageMaker's single entry point: one model per server by design",
    "/ping": "SageMaker health check: the appliance has /health and /ready",
    "/load": "vLLM's server-load counter: the appliance's /metrics has requests in flight",
    "/health": "the appliance's own /health (and /ready) answers",
    "/metrics": "the appliance's own /metrics answers",
    "/v1/models": "the appliance's own /v1/models answers, with vLLM's fields",
    "/kv_event_sources": "KV-event publishing of one engine: an operator setting",
    "/scale_elastic_ep": "elastic expert parallelism: placement is the appliance's",
    "/is_scaling_elastic_ep": "elastic expert parallelism: placement is the appliance's",
    "/inference/v1/abort_requests": "aborts by request id across models: not exposed",
    "/docs": "the appliance's own OpenAPI docs",
    "/docs/oauth2-redirect": "the appliance's own OpenAPI docs",
    "/redoc": "the appliance's own OpenAPI docs",
    "/openapi.json": "the appliance's own OpenAPI docs",
}


def served_paths(routes: frozenset[str]) -> list[str]:
    """The model routes among an engine's routes (``"POST /tokenize"``...), as paths."""
    return sorted({_MODEL_ROUTE_KEYS[key] for key in routes if key in _MODEL_ROUTE_KEYS})


def wrong_route_message(model: str, path: str, routes: frozenset[str]) -> str:
    """What a client is told when ``model``'s engine does not serve ``path``."""
    served = ", ".join(served_paths(routes)) or "none"
    return f"model {model!r} does not serve {path}; the routes it serves: {served}"


def is_model_route(path: str) -> bool:
    """Whether ``path`` is one of the model routes (which need a user key, like ``/v1``)."""
    if path in _MODEL_PATHS or path == TOKENIZER_INFO.path:
        return True
    return path.startswith("/v1/responses/")


_MODEL_PATHS = frozenset(route.path for route in MODEL_ROUTES)
ENGINE_PATHS = frozenset(route.path for route in ENGINE_ROUTES)
"""The paths of ``ENGINE_ROUTES`` (a stored response's own routes are not among them)."""
_MODEL_ROUTE_KEYS = {route.key: route.path for route in MODEL_ROUTES}
