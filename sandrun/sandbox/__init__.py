"""The sandbox engine: run one command in fresh namespaces, fail closed.

``launcher`` is a small process (no Twisted) that forks a job per request;
``supervisor`` is its Twisted-side client that enforces time, CPU and output
limits and reports a ``SandboxResult``.
"""
