"""Sandrun pool coordinator: routes jobs to authenticated workers and proxies their API.

It imports from ``sandrun`` only the shared wire types and wire helpers, and
``sandrun.identity`` (to verify); ``sandrun`` never imports it.  The wire modules are
``sandrun.wire`` (types) and ``sandrun.httpjson`` (JSON answers, errors, CORS), and
``sandrun.daemon`` (the ``--listen`` option, stopping on SIGTERM/SIGINT) is shared the same
way: leaves that import the standard library and Twisted, and from ``sandrun`` at most
``sandrun.wire``.
``service.py`` wires it together; ``proxy.py`` documents the API.
"""
