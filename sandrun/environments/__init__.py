"""Environment templates and per-job dependencies (issue 8).

- ``templates``: the pinned package lists, as data;
- ``registry``: where built templates live; ``/environments``;
- ``builder``: ``sandrun env build NAME`` (an admin command, never at request time);
- ``requirements``: a job's requirements.txt / package.json / Gemfile, parsed strictly;
- ``fetch``: fetch-only on the host (wheels, ``--ignore-scripts``, pure-Ruby gems) into
  a cache keyed by the file's hash;
- ``plan``: what one job gets: read-only binds, variables and an install step that
  runs inside its sandbox with the network off.

- ``staged``: ``run_in_environment``, the job manager's one call: prepare, install
  inside the sandbox, then run the job with what is left of its limits.

Everything but ``staged`` is standard library only (the admin command stays light);
``staged`` uses Twisted and the sandbox's types.  ``jobs`` and ``api`` may import this
package; it imports neither.
"""

from __future__ import annotations

from sandrun.environments.fetch import DependencyCache, Fetched
from sandrun.environments.plan import DEPS_MOUNT, ENV_MOUNT, EnvironmentPlan, Environments, prepare
from sandrun.environments.registry import (
                                       BuiltEnvironment,
                                       EnvironmentNotBuilt,
                                       EnvironmentUnavailable,
                                       Registry,
                                       UnknownEnvironment,
)
from sandrun.environments.requirements import DependencyError
from sandrun.environments.templates import TEMPLATES, Template

__all__ = [
                                       "DEPS_MOUNT",
                                       "ENV_MOUNT",
                                       "TEMPLATES",
                                       "BuiltEnvironment",
                                       "DependencyCache",
                                       "DependencyError",
                                       "EnvironmentNotBuilt",
                                       "EnvironmentPlan",
                                       "EnvironmentUnavailable",
                                       "Environments",
                                       "Fetched",
                                       "Registry",
                                       "Template",
                                       "UnknownEnvironment",
                                       "prepare",
]
