"""Sandrun pool coordinator: routes jobs to authenticated workers and proxies their API.

It imports from ``sandrun`` only the shared wire types and wire helpers, and
``sandrun.identity`` (to verify); ``sandrun`` never imports it.  The wire modules are
leaves that import the standard library and Twisted, and from ``sandrun`` only each
other: ``sandrun.wire`` (types), ``sandrun.httpjson`` (JSON answers, errors, CORS),
``sandrun.netaddr`` (client addresses, X-Forwarded-For), ``sandrun.daemon``
(``--listen``, stopping on SIGTERM/SIGINT, the connection flags), ``sandrun.connections``
(connection caps, header deadline, upload budget), ``sandrun.pages`` (the OpenAPI
document, ``/docs`` and the web page, from files inside the package) and
``sandrun.gpuwire`` (which GPU can run a job).
``service.py`` wires it together; ``proxy.py`` documents the API.
"""
