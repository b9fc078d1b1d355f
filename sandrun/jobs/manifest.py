"""The job manifest: strict parsing of the client's JSON into a frozen ``Manifest``.

Everything a client sends about how to run a job goes through
:func:`parse_manifest`; nothing deeper reads the raw dict.  Validation is
strict on purpose: an unknown field, a wrong type (``true`` is not an
integer) or a value over a server limit is a :class:`ManifestError` naming
the field, never silently ignored, coerced or clamped.

JSON ``null`` counts as "not given" only for the fields whose default is
"none" (``interpreter``, ``requirements``, ``cpu_seconds``, ``gpu`` and the
optional keys of ``gpu``); anywhere else it is a type error.

Pure stdlib, no Twisted: the API layer maps :class:`ManifestError` to a 400.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandrun.config import Limits

__all__ = [
    "ALLOWED_INTERPRETERS",
    "EXTENSION_INTERPRETERS",
    "REQUIREMENTS_FILES",
    "RESERVED_ENV",
    "GpuRequest",
    "Manifest",
    "MAX_ARG_BYTES",
    "MAX_ARGV_ENV_BYTES",
    "MAX_OUTPUT_PATTERNS",
    "ManifestError",
    "loads_strict",
    "parse_manifest",
    "parse_manifest_json",
    "relative_path_problem",
]

# Names a manifest may give in ``interpreter``, mapped to the name the sandbox runs.
ALLOWED_INTERPRETERS: Mapping[str, str] = {
    "python3": "python3",
    "python": "python3",
    "node": "node",
    "bash": "bash",
    "sh": "sh",
    "ruby": "ruby",
    "Rscript": "Rscript",
    "perl": "perl",
    "php": "php",
}

# Entrypoint extension (case-sensitive) -> interpreter; anything else runs directly.
EXTENSION_INTERPRETERS: Mapping[str, str] = {
    ".py": "python3",
    ".js": "node",
    ".mjs": "node",
    ".sh": "bash",
    ".rb": "ruby",
    ".R": "Rscript",
    ".r": "Rscript",
    ".pl": "perl",
    ".php": "php",
}

# Basenames ``requirements`` may name: pip, npm, bundler.
REQUIREMENTS_FILES = frozenset({"requirements.txt", "package.json", "Gemfile"})

# Variables the sandbox sets itself; a manifest may not override them.
RESERVED_ENV = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TERM",
                          "NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"})

MIN_MEMORY_MB = 16  # below this no interpreter starts
MIN_CPUS = 0.01  # the kernel's smallest CPU bandwidth quota is 1 ms per 100 ms period
# Caps that turn an exec-time E2BIG (a confusing sandbox_error) into a 400 naming the field:
# Linux refuses any one argv/env string of 128 KiB or more (MAX_ARG_STRLEN), and all of them
# together beyond a quarter of the stack rlimit; the sandbox's own variables need room too.
MAX_ARG_BYTES = 128 * 1024 - 1  # one argument, or one NAME=value, in UTF-8 bytes
MAX_ARGV_ENV_BYTES = 256 * 1024  # all arguments and env strings together, in UTF-8 bytes
# ... and as the launch request carries them (JSON escapes: a control character takes 6
# bytes): one message on the launcher's socket holds about 208 KiB, the policy included.
MAX_LAUNCH_ARGV_ENV_BYTES = 192 * 1024
MAX_OUTPUT_PATTERNS = 256  # every listed output is matched against every pattern
MAX_REPLICAS = 16  # a coordinator's --max-replicas is lower; a worker runs one copy regardless

_FIELDS = frozenset(
    {
        "entrypoint",
        "interpreter",
        "args",
        "env",
        "stdin",
        "outputs",
        "requirements",
        "environment",
        "timeout",
        "memory_mb",
        "cpu_seconds",
        "cpus",
        "gpu",
        "replicas",
    }
)
_GPU_FIELDS = frozenset(
    {"required", "device_id", "min_vram_gb", "cuda_version", "compute_capability"}
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENVIRONMENT_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_CUDA_VERSION = re.compile(r"[0-9]{1,4}(\.[0-9]{1,4}){0,2}")
_COMPUTE_CAPABILITY = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")


class ManifestError(Exception):
    """The manifest is invalid; ``field`` is the dotted name at fault.

    Examples of ``field``: ``"timeout"``, ``"env.LD_PRELOAD"``,
    ``"outputs[2]"``, ``"gpu.device_id"``, or ``"manifest"`` when the
    document as a whole is wrong (not JSON, not an object).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GpuRequest:
    """What the job asks of a GPU; ``required`` false means "use one if there is one"."""

    required: bool = False
    device_id: int | None = None  # a specific device index, >= 0
    min_vram_gb: float | None = None  # GB of device memory, > 0
    cuda_version: str | None = None  # e.g. "12.1"
    compute_capability: str | None = None  # e.g. "8.0"

    def as_json(self) -> dict[str, Any]:
        return {
            "required": self.required,
            "device_id": self.device_id,
            "min_vram_gb": self.min_vram_gb,
            "cuda_version": self.cuda_version,
            "compute_capability": self.compute_capability,
        }


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with every default filled in.

    ``env`` is sorted by name, so two manifests that differ only in the
    order of their ``env`` object are equal and hash the same.
    """

    entrypoint: str  # safe relative path inside the job directory
    interpreter: str | None  # resolved name from ALLOWED_INTERPRETERS; None = run directly
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    stdin: str = ""
    outputs: tuple[str, ...] = ()  # glob patterns; empty = every file
    requirements: str | None = None  # safe relative path
    environment: str | None = None  # a template; None: not named (``Registry.require``)
    timeout: int = 300  # seconds of wall-clock time
    memory_mb: int = 512  # MB of RAM
    cpu_seconds: float | None = None  # total CPU time allowed, None = no cap but timeout
    cpus: float = 1.0  # CPU bandwidth: cores' worth of CPU time per wall second
    gpu: GpuRequest | None = None
    # How many workers a coordinator runs the job on, comparing their signed results;
    # a worker alone runs it once whatever this says.
    replicas: int = 1

    def as_json(self) -> dict[str, Any]:
        """The canonical dict (every field, defaults filled): what ``job_hash`` covers.

        ``parse_manifest(m.as_json(), limits) == m`` for any manifest that
        the same limits accepted.
        """
        return {
            "entrypoint": self.entrypoint,
            "interpreter": self.interpreter,
            "args": list(self.args),
            "env": dict(self.env),
            "stdin": self.stdin,
            "outputs": list(self.outputs),
            "requirements": self.requirements,
            "environment": self.environment,
            "timeout": self.timeout,
            "memory_mb": self.memory_mb,
            "cpu_seconds": self.cpu_seconds,
            "cpus": self.cpus,
            "gpu": None if self.gpu is None else self.gpu.as_json(),
            "replicas": self.replicas,
        }

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def argv(self) -> list[str]:
        """The command vector, relative to the job directory (never run through a shell)."""
        if self.interpreter is None:
            return ["./" + self.entrypoint, *self.args]
        return [self.interpreter, self.entrypoint, *self.args]


def relative_path_problem(path: str, limits: Limits) -> str | None:
    """Why ``path`` is not a safe, normalised relative path, or None if it is one.

    Safe means: non-empty, no NUL, encodable as UTF-8 (JSON can carry lone
    surrogates, which cannot name a file), not absolute, no ``..``, no empty
    or ``.`` component (so no ``a//b``, ``./a`` or trailing ``/``), at most
    ``limits.max_path_bytes`` in all and ``limits.max_name_bytes`` per
    component.  Shared with ``workspace`` so uploads and manifests agree.
    """
    if not path:
        return "must not be empty"
    if "\x00" in path:
        return "must not contain NUL"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid UTF-8 text"
    if len(encoded) > limits.max_path_bytes:
        return f"longer than {limits.max_path_bytes} bytes"
    if path.startswith("/"):
        return "must be a relative path"
    parts = path.split("/")
    if ".." in parts:
        return "must not contain '..'"
    for part in parts:
        if part in ("", "."):
            return "must be normalised (no empty or '.' components)"
        if len(part.encode("utf-8")) > limits.max_name_bytes:
            return f"has a component longer than {limits.max_name_bytes} bytes"
    return None


def parse_manifest_json(
    text: bytes | str, limits: Limits, *, default_entrypoint: str | None = None
) -> Manifest:
    """Parse a manifest given as JSON text (the form field or ``job.json``).

    Invalid UTF-8, invalid JSON, ``NaN``/``Infinity`` and duplicate keys
    are all ``ManifestError(field="manifest")`` (see ``loads_strict``).
    """
    raw = loads_strict(text, "manifest")
    return parse_manifest(raw, limits, default_entrypoint=default_entrypoint)


def loads_strict(text: bytes | str, field: str) -> Any:
    """JSON as the API takes it (a manifest, a JSON submission), else ``ManifestError(field)``.

    Refused: invalid UTF-8, invalid JSON, ``NaN``/``Infinity``, duplicate keys
    (which parsers disagree on) and nesting deeper than Python's recursion limit.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(field, f"not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except _DuplicateKey as e:
        raise ManifestError(field, f"duplicate key {e.args[0]!r}") from None
    except ValueError as e:  # JSONDecodeError and the NaN/Infinity refusal
        raise ManifestError(field, f"not valid JSON: {e}") from None
    except RecursionError:
        raise ManifestError(field, "nested too deeply") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_manifest(
    raw: object, limits: Limits, *, default_entrypoint: str | None = None
) -> Manifest:
    """Validate a decoded manifest and fill in defaults from ``limits``.

    ``default_entrypoint`` is the file's name for a single-file upload: it
    is used when ``raw`` has no ``entrypoint``.  Raises ManifestError naming
    the first field at fault; unknown fields come first, the first of them
    in ``field`` and all of them in the message.
    """
    if not isinstance(raw, dict):
        raise ManifestError("manifest", "must be a JSON object")
    unknown = sorted(str(k) for k in raw if k not in _FIELDS)
    if unknown:
        raise ManifestError(
            unknown[0], "unknown field" + ("s " if len(unknown) > 1 else " ") + ", ".join(unknown)
        )

    if "entrypoint" in raw:
        entrypoint = _path(raw["entrypoint"], "entrypoint", limits)
    elif default_entrypoint is not None:
        entrypoint = _path(default_entrypoint, "entrypoint", limits)
    else:
        raise ManifestError("entrypoint", "required")

    if entrypoint.startswith("-"):
        # An interpreter would take it for an option: python3 -c ...
        raise ManifestError("entrypoint", "must not start with '-'")
    interpreter = _interpreter(raw.get("interpreter"), entrypoint)
    args = tuple(
        _text(v, f"args[{i}]", nul_ok=False)
        for i, v in enumerate(_list(raw.get("args", []), "args"))
    )
    env = _env(raw.get("env", {}))
    _check_exec_sizes(args, env)
    stdin = _text(raw.get("stdin", ""), "stdin", nul_ok=True)
    if len(stdin.encode("utf-8")) > limits.max_stdin_bytes:
        raise ManifestError("stdin", f"longer than {limits.max_stdin_bytes} bytes")
    patterns = _list(raw.get("outputs", []), "outputs")
    if len(patterns) > MAX_OUTPUT_PATTERNS:
        raise ManifestError("outputs", f"more than {MAX_OUTPUT_PATTERNS} patterns")
    outputs = tuple(_glob(v, f"outputs[{i}]", limits) for i, v in enumerate(patterns))

    requirements = raw.get("requirements")
    if requirements is not None:
        requirements = _path(requirements, "requirements", limits)
        basename = requirements.rsplit("/", 1)[-1]
        if basename not in REQUIREMENTS_FILES:
            raise ManifestError(
                "requirements", "must name " + ", ".join(sorted(REQUIREMENTS_FILES))
            )

    environment = raw.get("environment")
    if environment is not None:
        environment = _text(environment, "environment", nul_ok=False)
        if (
            not _ENVIRONMENT_NAME.fullmatch(environment)
            or len(environment) > limits.max_name_bytes
        ):
            raise ManifestError("environment", "must be a name like 'default' or 'ml-basic'")

    timeout = _int(raw.get("timeout", limits.default_timeout), "timeout", 1, limits.max_timeout)
    memory_mb = _int(
        raw.get("memory_mb", limits.default_memory_mb),
        "memory_mb",
        MIN_MEMORY_MB,
        limits.max_memory_mb,
    )
    cpu_seconds = raw.get("cpu_seconds")
    if cpu_seconds is not None:
        cpu_seconds = _positive_number(cpu_seconds, "cpu_seconds")
        if cpu_seconds > limits.max_cpu_seconds:
            raise ManifestError("cpu_seconds", f"at most {limits.max_cpu_seconds:g}")
    cpus = _positive_number(raw.get("cpus", limits.default_cpus), "cpus")
    if cpus > limits.max_cpus or cpus < MIN_CPUS:
        raise ManifestError("cpus", f"between {MIN_CPUS:g} and {limits.max_cpus:g}")

    gpu = raw.get("gpu")
    replicas = _int(raw.get("replicas", 1), "replicas", 1, MAX_REPLICAS)
    return Manifest(
        entrypoint=entrypoint,
        interpreter=interpreter,
        args=args,
        env=env,
        stdin=stdin,
        outputs=outputs,
        requirements=requirements,
        environment=environment,
        timeout=timeout,
        memory_mb=memory_mb,
        cpu_seconds=cpu_seconds,
        cpus=cpus,
        gpu=None if gpu is None else _gpu(gpu),
        replicas=replicas,
    )


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _text(value: object, field: str, *, nul_ok: bool) -> str:
    if not isinstance(value, str):
        raise ManifestError(field, f"must be a string, not {_type_name(value)}")
    if not nul_ok and "\x00" in value:
        raise ManifestError(field, "must not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(field, "must be valid UTF-8 text") from None
    return value


def _list(value: object, field: str) -> list[object]:
    if not isinstance(value, list):
        raise ManifestError(field, f"must be a list, not {_type_name(value)}")
    return value


def _path(value: object, field: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ManifestError(field, f"must be a string, not {_type_name(value)}")
    problem = relative_path_problem(value, limits)
    if problem is not None:
        raise ManifestError(field, problem)
    return value


def _interpreter(value: object, entrypoint: str) -> str | None:
    if value is None:
        basename = entrypoint.rsplit("/", 1)[-1]
        dot = basename.rfind(".")
        if dot <= 0:  # no extension, or a dotfile such as ".run"
            return None
        return EXTENSION_INTERPRETERS.get(basename[dot:])
    if not isinstance(value, str):
        raise ManifestError("interpreter", f"must be a string, not {_type_name(value)}")
    resolved = ALLOWED_INTERPRETERS.get(value)
    if resolved is None:
        raise ManifestError(
            "interpreter", "must be one of " + ", ".join(sorted(ALLOWED_INTERPRETERS))
        )
    return resolved


def _env(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ManifestError("env", f"must be an object, not {_type_name(value)}")
    pairs = []
    for name, text in value.items():
        field = f"env.{name}"
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ManifestError(field, "name must match [A-Za-z_][A-Za-z0-9_]*")
        if name.startswith("LD_"):
            raise ManifestError(field, "LD_* variables are not allowed")
        if name in RESERVED_ENV:
            raise ManifestError(field, "set by the sandbox; cannot be overridden")
        pairs.append((name, _text(text, field, nul_ok=False)))
    return tuple(sorted(pairs))


def _check_exec_sizes(args: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> None:
    total = 0
    for i, arg in enumerate(args):
        size = len(arg.encode("utf-8")) + 1  # + the NUL that ends it
        if size > MAX_ARG_BYTES:
            raise ManifestError(f"args[{i}]", f"longer than {MAX_ARG_BYTES - 1} bytes")
        total += size
        if total > MAX_ARGV_ENV_BYTES:
            raise ManifestError("args", f"more than {MAX_ARGV_ENV_BYTES} bytes in all")
    for name, value in env:
        size = len(name.encode("utf-8")) + 1 + len(value.encode("utf-8")) + 1
        if size > MAX_ARG_BYTES:
            raise ManifestError(f"env.{name}", f"longer than {MAX_ARG_BYTES - 1} bytes")
        total += size
        if total > MAX_ARGV_ENV_BYTES:
            raise ManifestError("env", f"args and env more than {MAX_ARGV_ENV_BYTES} bytes")
    encoded = len(json.dumps(list(args)))
    if encoded > MAX_LAUNCH_ARGV_ENV_BYTES:
        raise ManifestError("args", f"more than {MAX_LAUNCH_ARGV_ENV_BYTES} bytes as JSON "
                            "(a control character counts 6)")
    encoded += len(json.dumps([list(pair) for pair in env]))
    if encoded > MAX_LAUNCH_ARGV_ENV_BYTES:
        raise ManifestError("env", f"args and env more than {MAX_LAUNCH_ARGV_ENV_BYTES} bytes "
                            "as JSON (a control character counts 6)")


def _glob(value: object, field: str, limits: Limits) -> str:
    """A pattern for ``workspace.match_outputs``: a safe relative path that may end in ``/``."""
    if not isinstance(value, str):
        raise ManifestError(field, f"must be a string, not {_type_name(value)}")
    problem = relative_path_problem(value[:-1] if value.endswith("/") else value, limits)
    if problem is not None:
        raise ManifestError(field, problem)
    return value


def _int(value: object, field: str, low: int, high: int) -> int:
    # bool is a subclass of int; ``true`` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(field, f"must be an integer, not {_type_name(value)}")
    if not low <= value <= high:
        raise ManifestError(field, f"must be between {low} and {high}")
    return value


def _positive_number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(field, f"must be a number, not {_type_name(value)}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ManifestError(field, "must be a positive number")
    return number


def _gpu(value: object) -> GpuRequest:
    if not isinstance(value, dict):
        raise ManifestError("gpu", f"must be an object, not {_type_name(value)}")
    unknown = sorted(str(k) for k in value if k not in _GPU_FIELDS)
    if unknown:
        raise ManifestError(f"gpu.{unknown[0]}", "unknown field " + ", ".join(unknown))

    required = value.get("required", False)
    if not isinstance(required, bool):
        raise ManifestError("gpu.required", f"must be a boolean, not {_type_name(required)}")

    device_id = value.get("device_id")
    if device_id is not None:
        if isinstance(device_id, bool) or not isinstance(device_id, int):
            raise ManifestError(
                "gpu.device_id", f"must be an integer, not {_type_name(device_id)}"
            )
        if device_id < 0:
            raise ManifestError("gpu.device_id", "must not be negative")

    min_vram_gb = value.get("min_vram_gb")
    if min_vram_gb is not None:
        min_vram_gb = _positive_number(min_vram_gb, "gpu.min_vram_gb")

    cuda_version = value.get("cuda_version")
    if cuda_version is not None:
        cuda_version = _text(cuda_version, "gpu.cuda_version", nul_ok=False)
        if not _CUDA_VERSION.fullmatch(cuda_version):
            raise ManifestError("gpu.cuda_version", "must look like '12.1'")

    capability = value.get("compute_capability")
    if capability is not None:
        capability = _text(capability, "gpu.compute_capability", nul_ok=False)
        if not _COMPUTE_CAPABILITY.fullmatch(capability):
            raise ManifestError("gpu.compute_capability", "must look like '8.0'")

    return GpuRequest(
        required=required,
        device_id=device_id,
        min_vram_gb=min_vram_gb,
        cuda_version=cuda_version,
        compute_capability=capability,
    )
