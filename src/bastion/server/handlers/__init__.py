"""The relay's frame handlers, one module per concern, each exporting ``ROUTES``.

A handler is ``handler(request, services, frame)`` (see :mod:`._context`): it
touches its connection only through :class:`~._context.Request` and everything
else through :class:`~._context.Services`. Nothing registers itself at import:
``bastion.server.app`` lists the modules and builds the router once.
"""
