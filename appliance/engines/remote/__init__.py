"""Remote backends: catalogue entries with a ``backend_url``, proxied over httpx.

A remote is another appliance, a ``vllm serve`` or TGI's OpenAI API. Requests go to the same
route of ``backend_url`` with the body as the client sent it; answers come back as the
upstream's bytes (SSE streams chunk by chunk, never re-parsed). Transport failures map to the
appliance's backend errors (503 unreachable, 504 too slow, 502 garbage), and a circuit breaker
per backend stops a dead one from costing every request a connect attempt.

The package: ``settings`` (how backends are talked to), ``engine`` (one backend as an
``Engine``), ``relay`` (a stream's bytes passed through), ``envelope`` (what of an upstream's
answer reaches the client) and ``backends`` (every remote entry's engine, one pooled client).
"""

from appliance.engines.remote.backends import RemoteBackends
from appliance.engines.remote.engine import RemoteEngine
from appliance.engines.remote.settings import DETAIL_SCOPE, RemoteSettings

__all__ = ["DETAIL_SCOPE", "RemoteBackends", "RemoteEngine", "RemoteSettings"]
