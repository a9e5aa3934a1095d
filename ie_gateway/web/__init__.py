"""The admin's web page: ``web_routes(cfg, store, registry)`` gives the routes to mount in the
node's HTTP app (Starlette); templates in ``templates/``, rendered on the server."""

from ie_gateway.web.pages import Action, default_actions, web_routes

__all__ = ["Action", "default_actions", "web_routes"]
