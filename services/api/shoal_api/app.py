"""The FastAPI application: one router per API flavour, errors in one shape."""

from fastapi import FastAPI

from shoal_api import cluster, downloads, openai_chat, openai_models
from shoal_api.context import ApiContext
from shoal_api.errors import install_error_handlers
from shoal_api.placement_previews import previews_router


def create_app(context: ApiContext) -> FastAPI:
    # No generated docs pages: the routes parse bodies themselves, so the schema would be
    # empty, and /docs would load scripts from a CDN.
    app = FastAPI(title="Shoal", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.include_router(openai_chat.router(context))
    app.include_router(openai_models.router(context))
    # Before the cluster routes: /instance/previews must not match /instance/{instance_id}.
    app.include_router(previews_router(context))
    app.include_router(cluster.router(context))
    app.include_router(downloads.router(context))
    return app
