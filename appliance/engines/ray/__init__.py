"""Entries that run on a Ray cluster through Ray Serve LLM (the only package importing ``ray``).

``mapping`` turns an entry into Ray Serve LLM's configuration (plain data, shared with
``appliance export ray-serve``); ``cluster`` is the connection to Ray; ``engine`` the entry's
engine, which deploys it and relays requests to it.
"""

from appliance.engines.ray.engine import RayApps, RayEngine
from appliance.engines.ray.mapping import RAY_ROUTES, llm_config, serve_deploy_config

__all__ = ["RAY_ROUTES", "RayApps", "RayEngine", "llm_config", "serve_deploy_config"]
