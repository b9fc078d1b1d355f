"""Sandrun pool coordinator: routes jobs to authenticated workers and proxies their API.

It imports from ``sandrun`` only ``sandrun.wire`` and ``sandrun.identity``; ``sandrun``
never imports it.  ``service.py`` wires it together; ``proxy.py`` documents the API.
"""
