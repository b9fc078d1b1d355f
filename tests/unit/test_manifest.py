"""Manifest parsing: every field's happy path and each way a client can get it wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandrun.config import Limits
from sandrun.jobs.manifest import (
    MAX_ARG_BYTES,
    MAX_ARGV_ENV_BYTES,
    MAX_OUTPUT_PATTERNS,
    GpuRequest,
    Manifest,
    ManifestError,
    parse_manifest,
    parse_manifest_json,
    relative_path_problem,
)

LIMITS = Limits()


def parse(**fields: Any) -> Manifest:
    return parse_manifest({"entrypoint": "main.py", **fields}, LIMITS)


def refused(raw: object, limits: Limits = LIMITS, **kwargs: Any) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw, limits, **kwargs)
    return info.value


def refused_field(**fields: Any) -> ManifestError:
    return refused({"entrypoint": "main.py", **fields})


# -- the whole document --------------------------------------------------------------------


def test_a_minimal_manifest_gets_every_default_from_the_limits() -> None:
    limits = Limits(default_timeout=42, default_memory_mb=100)
    m = parse_manifest({"entrypoint": "main.py"}, limits)
    assert m == Manifest(
        entrypoint="main.py",
        interpreter="python3",
        args=(),
        env=(),
        stdin="",
        outputs=(),
        requirements=None,
        environment=None,  # not named: default once built, else the host's interpreters
        timeout=42,
        memory_mb=100,
        cpu_seconds=None,
        gpu=None,
    )


def test_a_full_manifest_keeps_every_field() -> None:
    m = parse_manifest(
        {
            "entrypoint": "src/run.py",
            "interpreter": "python",
            "args": ["--n", "3"],
            "env": {"B": "2", "A": "1"},
            "stdin": "input\n",
            "outputs": ["*.png", "out/"],
            "requirements": "src/requirements.txt",
            "environment": "ml-gpu",
            "timeout": 60,
            "memory_mb": 1024,
            "cpu_seconds": 30,
            "gpu": {"required": True, "min_vram_gb": 8},
        },
        LIMITS,
    )
    assert m.entrypoint == "src/run.py"
    assert m.interpreter == "python3"
    assert m.args == ("--n", "3")
    assert m.env == (("A", "1"), ("B", "2"))
    assert m.env_dict() == {"A": "1", "B": "2"}
    assert m.stdin == "input\n"
    assert m.outputs == ("*.png", "out/")
    assert m.requirements == "src/requirements.txt"
    assert m.environment == "ml-gpu"
    assert m.timeout == 60
    assert m.memory_mb == 1024
    assert m.cpu_seconds == 30.0 and isinstance(m.cpu_seconds, float)
    assert m.gpu == GpuRequest(required=True, min_vram_gb=8.0)


def test_a_manifest_that_is_not_an_object_is_refused_as_a_whole() -> None:
    for raw in (["main.py"], "main.py", None, 3):
        assert refused(raw).field == "manifest"


def test_an_unknown_field_is_refused_by_name() -> None:
    error = refused_field(timout=10)
    assert error.field == "timout"
    assert "timout" in error.message


def test_several_unknown_fields_are_all_named() -> None:
    error = refused_field(zeta=1, alpha=2)
    assert error.field == "alpha"
    assert "alpha" in error.message and "zeta" in error.message


def test_the_canonical_json_holds_every_field_and_parses_back_to_the_same_manifest() -> None:
    m = parse(
        args=["x"],
        env={"Z": "1", "A": "2"},
        outputs=["**/*.csv"],
        cpu_seconds=2.5,
        gpu={"device_id": 0, "cuda_version": "12.1", "compute_capability": "8.0"},
    )
    canonical = m.as_json()
    assert sorted(canonical) == sorted(
        [
            "entrypoint", "interpreter", "args", "env", "stdin", "outputs", "requirements",
            "environment", "timeout", "memory_mb", "cpu_seconds", "cpus", "gpu", "replicas",
        ]
    )
    assert canonical["env"] == {"A": "2", "Z": "1"}
    assert canonical["gpu"] == {
        "required": False,
        "device_id": 0,
        "min_vram_gb": None,
        "cuda_version": "12.1",
        "compute_capability": "8.0",
    }
    assert json.loads(json.dumps(canonical)) == canonical
    assert parse_manifest(canonical, LIMITS) == m


def test_env_order_does_not_change_the_manifest() -> None:
    assert parse(env={"A": "1", "B": "2"}) == parse(env={"B": "2", "A": "1"})


# -- entrypoint and paths --------------------------------------------------------------------


def test_entrypoint_is_required_without_a_single_file_upload() -> None:
    error = refused({})
    assert error.field == "entrypoint"


def test_a_single_file_upload_supplies_the_default_entrypoint() -> None:
    m = parse_manifest({}, LIMITS, default_entrypoint="script.rb")
    assert m.entrypoint == "script.rb"
    assert m.interpreter == "ruby"


def test_an_explicit_entrypoint_wins_over_the_single_file_default() -> None:
    m = parse_manifest({"entrypoint": "b.py"}, LIMITS, default_entrypoint="a.js")
    assert m.entrypoint == "b.py"


def test_an_unsafe_default_entrypoint_is_refused_too() -> None:
    assert refused({}, default_entrypoint="../x.py").field == "entrypoint"


@pytest.mark.parametrize(
    "path",
    [
        "../x.py",
        "a/../../x.py",
        "a/..",
        "/etc/passwd",
        "//x.py",
        "a\x00.py",
        "",
        "./x.py",
        "a//x.py",
        "a/./x.py",
        "dir/",
        "\udcff.py",  # a lone surrogate: JSON can carry it, UTF-8 cannot
    ],
)
def test_an_unsafe_entrypoint_is_refused(path: str) -> None:
    assert refused({"entrypoint": path}).field == "entrypoint"


def test_a_path_over_the_byte_limit_is_refused_and_one_at_it_accepted() -> None:
    limits = Limits(max_path_bytes=20, max_name_bytes=20)
    ok = "a/" + "é" * 6 + "x.py"  # 2 + 12 + 4 = 18 bytes
    assert parse_manifest({"entrypoint": ok}, limits).entrypoint == ok
    assert refused({"entrypoint": "a/" + "é" * 8 + "x.py"}, limits).field == "entrypoint"


def test_a_path_component_over_the_name_limit_is_refused() -> None:
    limits = Limits(max_name_bytes=8)
    assert parse_manifest({"entrypoint": "abcd/efgh.py"}, limits).entrypoint == "abcd/efgh.py"
    assert refused({"entrypoint": "abcdefghi/x.py"}, limits).field == "entrypoint"


def test_an_entrypoint_an_interpreter_would_read_as_an_option_is_refused() -> None:
    assert refused({"entrypoint": "-c"}).field == "entrypoint"
    assert parse_manifest({"entrypoint": "a/-c.py"}, LIMITS).entrypoint == "a/-c.py"


def test_an_entrypoint_that_is_not_a_string_is_refused() -> None:
    for value in (1, None, ["main.py"], {"path": "main.py"}):
        assert refused({"entrypoint": value}).field == "entrypoint"


def test_relative_path_problem_accepts_nested_paths_and_explains_refusals() -> None:
    assert relative_path_problem("a/b/c.txt", LIMITS) is None
    assert relative_path_problem("..", LIMITS) == "must not contain '..'"
    assert relative_path_problem("/a", LIMITS) == "must be a relative path"


# -- interpreter -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entrypoint", "interpreter"),
    [
        ("main.py", "python3"),
        ("app.js", "node"),
        ("app.mjs", "node"),
        ("run.sh", "bash"),
        ("x.rb", "ruby"),
        ("stats.R", "Rscript"),
        ("stats.r", "Rscript"),
        ("x.pl", "perl"),
        ("index.php", "php"),
        ("dir.py/prog", None),
        ("prog", None),
        ("a.out", None),
        (".py", None),
        ("MAIN.PY", None),
    ],
)
def test_the_interpreter_follows_the_entrypoint_extension(
    entrypoint: str, interpreter: str | None
) -> None:
    assert parse_manifest({"entrypoint": entrypoint}, LIMITS).interpreter == interpreter


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        ("python3", "python3"),
        ("python", "python3"),
        ("node", "node"),
        ("bash", "bash"),
        ("sh", "sh"),
        ("ruby", "ruby"),
        ("Rscript", "Rscript"),
        ("perl", "perl"),
        ("php", "php"),
    ],
)
def test_an_explicit_interpreter_wins_over_the_extension(given: str, resolved: str) -> None:
    assert parse_manifest({"entrypoint": "job.txt", "interpreter": given}, LIMITS).interpreter == (
        resolved
    )


@pytest.mark.parametrize("bad", ["/usr/bin/python3", "python2", "gcc", "", "PYTHON3", "sh -c"])
def test_an_interpreter_outside_the_list_is_refused(bad: str) -> None:
    error = refused_field(interpreter=bad)
    assert error.field == "interpreter"


def test_an_interpreter_that_is_not_a_string_is_refused() -> None:
    assert refused_field(interpreter=["python3"]).field == "interpreter"


def test_a_null_interpreter_means_from_the_extension() -> None:
    assert parse(interpreter=None).interpreter == "python3"


def test_argv_runs_the_entrypoint_with_its_interpreter() -> None:
    assert parse(args=["-v", "a b"]).argv() == ["python3", "main.py", "-v", "a b"]


def test_argv_runs_a_file_without_interpreter_directly() -> None:
    m = parse_manifest({"entrypoint": "bin/tool", "args": ["x"]}, LIMITS)
    assert m.argv() == ["./bin/tool", "x"]


# -- args, env, stdin ------------------------------------------------------------------------


def test_args_must_be_a_list_of_strings() -> None:
    assert refused_field(args="--flag").field == "args"
    assert refused_field(args=["ok", 3]).field == "args[1]"
    assert refused_field(args=["ok", None]).field == "args[1]"


def test_an_argument_with_nul_is_refused() -> None:
    assert refused_field(args=["a", "b\x00c"]).field == "args[1]"


def test_an_argument_the_kernel_would_refuse_to_exec_is_refused() -> None:
    assert parse(args=["a" * (MAX_ARG_BYTES - 1)]).args[0] == "a" * (MAX_ARG_BYTES - 1)
    assert refused_field(args=["ok", "a" * MAX_ARG_BYTES]).field == "args[1]"
    assert refused_field(env={"BIG": "v" * MAX_ARG_BYTES}).field == "env.BIG"


def test_args_and_env_together_over_the_exec_budget_are_refused() -> None:
    piece = "a" * (MAX_ARG_BYTES // 2)
    count = MAX_ARGV_ENV_BYTES // len(piece) + 1
    assert refused_field(args=[piece] * count).field == "args"
    half = [piece] * (count // 2)
    env = {f"E{i}": piece for i in range(count - len(half))}
    assert refused_field(args=half, env=env).field == "env"


def test_env_names_and_values_are_kept() -> None:
    assert parse(env={"_X1": "", "name": "a=b"}).env == (("_X1", ""), ("name", "a=b"))


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_"])
def test_ld_variables_are_refused(name: str) -> None:
    error = refused_field(env={"OK": "1", name: "/tmp/evil.so"})
    assert error.field == f"env.{name}"


@pytest.mark.parametrize("name", ["PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TERM"])
def test_the_sandbox_own_variables_are_refused(name: str) -> None:
    assert refused_field(env={name: "x"}).field == f"env.{name}"


@pytest.mark.parametrize("name", ["1X", "A-B", "A B", "", "A=B", "É"])
def test_an_env_name_outside_the_pattern_is_refused(name: str) -> None:
    assert refused_field(env={name: "x"}).field == f"env.{name}"


def test_an_env_value_that_is_not_a_string_or_has_nul_is_refused() -> None:
    assert refused_field(env={"N": 1}).field == "env.N"
    assert refused_field(env={"N": "a\x00b"}).field == "env.N"
    assert refused_field(env=["N=1"]).field == "env"


def test_stdin_is_kept_up_to_the_limit() -> None:
    limits = Limits(max_stdin_bytes=4)
    m = parse_manifest({"entrypoint": "main.py", "stdin": "a\x00bc"}, limits)
    assert m.stdin == "a\x00bc"
    assert refused({"entrypoint": "main.py", "stdin": "abcde"}, limits).field == "stdin"
    assert refused({"entrypoint": "main.py", "stdin": "éé é"}, limits).field == "stdin"


def test_stdin_must_be_a_string() -> None:
    assert refused_field(stdin=["line"]).field == "stdin"


# -- outputs, requirements, environment ----------------------------------------------------


def test_output_patterns_are_kept_in_order() -> None:
    assert parse(outputs=["out/", "**/*.csv", "a?.txt", "[ab].png"]).outputs == (
        "out/",
        "**/*.csv",
        "a?.txt",
        "[ab].png",
    )


@pytest.mark.parametrize("pattern", ["", "/", "/etc/*", "../*", "a/../b", "a\x00", "a//b", "./x"])
def test_an_unsafe_output_pattern_is_refused_by_index(pattern: str) -> None:
    assert refused_field(outputs=["ok.txt", pattern]).field == "outputs[1]"


def test_too_many_output_patterns_are_refused() -> None:
    assert len(parse(outputs=["*"] * MAX_OUTPUT_PATTERNS).outputs) == MAX_OUTPUT_PATTERNS
    assert refused_field(outputs=["*"] * (MAX_OUTPUT_PATTERNS + 1)).field == "outputs"


def test_outputs_must_be_a_list_of_strings() -> None:
    assert refused_field(outputs="*.txt").field == "outputs"
    assert refused_field(outputs=["a", "b", 3]).field == "outputs[2]"


@pytest.mark.parametrize("path", ["requirements.txt", "package.json", "Gemfile", "app/Gemfile"])
def test_requirements_names_a_known_dependency_file(path: str) -> None:
    assert parse(requirements=path).requirements == path


@pytest.mark.parametrize(
    "path", ["setup.py", "requirements.txt.bak", "../requirements.txt", "/requirements.txt", 1]
)
def test_requirements_naming_anything_else_is_refused(path: object) -> None:
    assert refused_field(requirements=path).field == "requirements"


@pytest.mark.parametrize("name", ["default", "python-3-11", "r4", "0x"])
def test_environment_names_a_template(name: str) -> None:
    assert parse(environment=name).environment == name


@pytest.mark.parametrize("name", ["", "-x", "Default", "a_b", "../x", "a b", 3])
def test_an_environment_that_is_not_a_name_is_refused(name: object) -> None:
    assert refused_field(environment=name).field == "environment"


def test_an_environment_of_null_is_not_naming_one() -> None:
    assert parse(environment=None).environment is None


# -- numbers ---------------------------------------------------------------------------------


def test_timeout_and_memory_accept_their_bounds() -> None:
    limits = Limits(max_timeout=100, max_memory_mb=256)
    low = parse_manifest({"entrypoint": "m.py", "timeout": 1, "memory_mb": 16}, limits)
    high = parse_manifest({"entrypoint": "m.py", "timeout": 100, "memory_mb": 256}, limits)
    assert (low.timeout, low.memory_mb) == (1, 16)
    assert (high.timeout, high.memory_mb) == (100, 256)


def test_a_timeout_over_the_maximum_is_refused_not_clamped() -> None:
    error = refused_field(timeout=LIMITS.max_timeout + 1)
    assert error.field == "timeout"
    assert str(LIMITS.max_timeout) in error.message


@pytest.mark.parametrize("value", [0, -1])
def test_a_timeout_under_one_second_is_refused(value: int) -> None:
    assert refused_field(timeout=value).field == "timeout"


@pytest.mark.parametrize("value", [True, False, 10.0, "10", None, [10]])
def test_a_timeout_that_is_not_an_integer_is_refused(value: object) -> None:
    error = refused_field(timeout=value)
    assert error.field == "timeout"
    assert "integer" in error.message


@pytest.mark.parametrize("value", [15, LIMITS.max_memory_mb + 1, True, 512.0, "512"])
def test_memory_outside_the_range_or_not_an_integer_is_refused(value: object) -> None:
    assert refused_field(memory_mb=value).field == "memory_mb"


def test_cpu_seconds_accepts_integers_and_fractions_up_to_the_limit() -> None:
    assert parse(cpu_seconds=0.5).cpu_seconds == 0.5
    assert parse(cpu_seconds=LIMITS.max_cpu_seconds).cpu_seconds == LIMITS.max_cpu_seconds
    assert parse(cpu_seconds=None).cpu_seconds is None


@pytest.mark.parametrize(
    "value", [0, -1, True, "10", LIMITS.max_cpu_seconds + 1, float("inf"), float("nan")]
)
def test_cpu_seconds_that_is_not_a_positive_number_within_the_limit_is_refused(
    value: object,
) -> None:
    assert refused_field(cpu_seconds=value).field == "cpu_seconds"


# -- gpu -------------------------------------------------------------------------------------


def test_a_gpu_request_keeps_every_key() -> None:
    gpu = parse(
        gpu={
            "required": True,
            "device_id": 1,
            "min_vram_gb": 16,
            "cuda_version": "12.1",
            "compute_capability": "8.6",
        }
    ).gpu
    assert gpu == GpuRequest(True, 1, 16.0, "12.1", "8.6")


def test_an_empty_gpu_object_is_an_optional_gpu() -> None:
    assert parse(gpu={}).gpu == GpuRequest(required=False)
    assert parse(gpu=None).gpu is None


@pytest.mark.parametrize(
    ("gpu", "field"),
    [
        ({"vram": 8}, "gpu.vram"),
        ({"required": 1}, "gpu.required"),
        ({"device_id": True}, "gpu.device_id"),
        ({"device_id": -1}, "gpu.device_id"),
        ({"device_id": "0"}, "gpu.device_id"),
        ({"min_vram_gb": 0}, "gpu.min_vram_gb"),
        ({"min_vram_gb": "8"}, "gpu.min_vram_gb"),
        ({"cuda_version": 12}, "gpu.cuda_version"),
        ({"cuda_version": "latest"}, "gpu.cuda_version"),
        ({"compute_capability": "8"}, "gpu.compute_capability"),
        (True, "gpu"),
        ([], "gpu"),
    ],
)
def test_a_wrong_gpu_request_is_refused_by_key(gpu: object, field: str) -> None:
    assert refused_field(gpu=gpu).field == field


# -- JSON text -------------------------------------------------------------------------------


def test_manifest_json_text_and_bytes_parse_alike() -> None:
    text = '{"entrypoint": "main.py", "timeout": 5}'
    assert parse_manifest_json(text, LIMITS) == parse_manifest_json(text.encode(), LIMITS)
    assert parse_manifest_json(text, LIMITS).timeout == 5


def test_manifest_json_passes_the_single_file_default_on() -> None:
    assert parse_manifest_json(b"{}", LIMITS, default_entrypoint="a.sh").interpreter == "bash"


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe{}",
        b'{"entrypoint": "m\xe9.py"}',
        b"not json",
        b"",
        b'{"entrypoint": "main.py",}',
        b'{"entrypoint": "main.py", "cpu_seconds": NaN}',
        b'{"entrypoint": "main.py", "cpu_seconds": Infinity}',
        b'{"entrypoint": "main.py", "timeout": 1, "timeout": 9999}',
        b"[" * 100_000,
    ],
)
def test_manifest_text_that_is_not_strict_utf8_json_is_refused_as_a_whole(text: bytes) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest_json(text, LIMITS)
    assert info.value.field == "manifest"


def test_a_json_manifest_with_a_wrong_field_names_that_field() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest_json(b'{"entrypoint": "main.py", "timeout": true}', LIMITS)
    assert info.value.field == "timeout"


def test_a_manifest_error_reads_as_field_and_message() -> None:
    error = ManifestError("env.LD_PRELOAD", "LD_* variables are not allowed")
    assert str(error) == "env.LD_PRELOAD: LD_* variables are not allowed"


def test_a_job_gets_one_core_by_default_and_may_ask_for_more_within_the_servers_maximum(
) -> None:
    limits = Limits(max_cpus=2.0)
    assert parse_manifest({"entrypoint": "a.py"}, limits=limits).cpus == 1.0
    assert parse_manifest({"entrypoint": "a.py", "cpus": 1.5}, limits=limits).cpus == 1.5
    for bad in (3, 0, -1, "1", True):
        with pytest.raises(ManifestError) as caught:
            parse_manifest({"entrypoint": "a.py", "cpus": bad}, limits=limits)
        assert caught.value.field == "cpus"


@pytest.mark.parametrize("field,manifest", [
    ("args", {"args": ["\x01" * 40_000]}),  # 40 KB raw, 240 KB as JSON
    ("env", {"args": ["a" * 100_000], "env": {"X": "\x01" * 20_000}}),
])
def test_args_or_env_too_large_for_the_launch_request_are_refused_naming_the_field(
        field: str, manifest: dict[str, Any]) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest({"entrypoint": "a.py", **manifest}, LIMITS)
    assert caught.value.field == field
    assert "as JSON" in caught.value.message


def test_replicas_default_to_one_and_take_a_bounded_integer() -> None:
    assert parse().replicas == 1
    assert parse(replicas=3).replicas == 3
    for bad in (0, 17, "2", 2.0, True):
        with pytest.raises(ManifestError) as caught:
            parse(replicas=bad)
        assert caught.value.field == "replicas"
