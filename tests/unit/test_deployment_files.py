"""docker-compose.yml, Procfile, Dockerfile and .env.example reference only things that
exist: modules, console commands, celery subcommands and options, environment variables the
code reads. There is no Docker engine here, so this is what keeps the files honest."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from importlib.metadata import distribution, entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_sagas.settings import SagaSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
APP_IMAGE = "celery-sagas:local"
PSYCOPG2 = "postgresql+psycopg2://"
# The commands the README documents; the deployment files run these (plus options).
DOCUMENTED = (
    "celery -A workers.app worker -l INFO -E",
    "celery -A workers.app worker -l INFO -Q sagas.control",
    "celery -A workers.app beat",
    "celery -A workers.app flower",
    "celery -A workers.app sagas flower",
    "celery-sagas migrate",
    "celery-sagas --app workers.app metrics",
    "python -m workers.bootstrap",
)
PROCESSES = {"release", "worker", "control", "beat", "flower", "metrics"}
# Read by the platform or the shell, not by our code: Heroku's port, the container's hostname.
PLATFORM_VARS = {"PORT", "HOSTNAME"}
CELERY_GLOBAL_OPTIONS = {"-A", "--app", "-b", "--broker", "--workdir"}
SAGAS_GLOBAL_OPTIONS = {"--app", "--database-url"}


# --------------------------------------------------------------------------- parsing


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def app_services() -> dict[str, dict[str, Any]]:
    """Services that run the project's image."""
    return {n: s for n, s in services().items() if s.get("image") == APP_IMAGE}


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def split_shell(script: str) -> list[list[str]]:
    """``a && b; c`` -> the argv of each simple command."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", script) if part.strip()]


def argvs(command: str | list[str]) -> list[list[str]]:
    if isinstance(command, str):
        return split_shell(command)
    if command[:2] in (["sh", "-c"], ["bash", "-c"]):
        return split_shell(command[2])
    if command and command[0] == "CMD-SHELL":
        return split_shell(command[1])
    if command and command[0] == "CMD":
        return [command[1:]]
    return [list(command)]


@dataclass(frozen=True)
class Command:
    origin: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.origin}: {shlex.join(self.argv)}"


def all_commands() -> list[Command]:
    found = []
    for name, service in app_services().items():
        for argv in argvs(service.get("command", [])):
            found.append(Command(f"compose {name}", tuple(argv)))
        check = service.get("healthcheck", {}).get("test")
        for argv in argvs(check) if check else []:
            found.append(Command(f"compose {name} healthcheck", tuple(argv)))
    for name, line in procfile().items():
        found.extend(Command(f"Procfile {name}", tuple(argv)) for argv in split_shell(line))
    return found


@dataclass(frozen=True)
class Cli:
    """A ``celery`` / ``celery-sagas`` call: global options, subcommand path, options."""

    program: str
    app: str | None
    before: tuple[str, ...]  # global options (with their values)
    path: tuple[str, ...]
    options: tuple[str, ...]


def parse_cli(argv: tuple[str, ...]) -> Cli:
    program, rest = argv[0], list(argv[1:])
    globals_ = CELERY_GLOBAL_OPTIONS if program == "celery" else SAGAS_GLOBAL_OPTIONS
    before: list[str] = []
    app = None
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        flag, _, value = option.partition("=")
        if flag in globals_ and not value:
            value = rest.pop(0)
        before += [flag, value]
        if flag in ("-A", "--app"):
            app = value
    path = []
    while rest and not rest[0].startswith("-"):
        path.append(rest.pop(0))
    return Cli(program, app, tuple(before), tuple(path), tuple(rest))


def cli_commands() -> list[tuple[Command, Cli]]:
    return [
        (c, parse_cli(c.argv)) for c in all_commands() if c.argv[0] in ("celery", "celery-sagas")
    ]


@functools.cache
def subprocess_env() -> dict[str, str]:
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"sagas-deploy-test-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAGAS_DATABASE_URL": f"sqlite:///{scratch / 'sagas.db'}",
        "CELERY_BROKER_URL": "memory://",
        "SAGAS_DEMO_DIR": str(scratch / "demo"),
    }


@functools.cache
def run_help(argv: tuple[str, ...]) -> str:
    result = subprocess.run(
        [str(BIN / argv[0]), *argv[1:], "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, f"{shlex.join(argv)} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def option_flags(options: tuple[str, ...]) -> Iterator[str]:
    for token in options:
        if token.startswith("-"):
            yield token.partition("=")[0]


def flower_options() -> set[str]:
    import flower.options  # noqa: F401 - defines Flower's tornado options
    from tornado.options import options

    return set(options._options)


# --------------------------------------------------------------------------- Procfile


def test_procfile_has_every_process_and_the_release_step() -> None:
    entries = procfile()
    assert entries.keys() >= PROCESSES
    assert entries["release"] == "celery-sagas migrate && python -m workers.bootstrap"


def test_the_migrate_service_runs_the_release_step() -> None:
    script = services()["migrate"]["command"]
    assert argvs(script) == split_shell(procfile()["release"])
    assert services()["migrate"]["restart"] == "no"


# --------------------------------------------------------------------------- programs


def console_scripts() -> dict[str, str]:
    """Our own [project.scripts] and the console scripts of our declared dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = dict(project["scripts"])
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        for ep in distribution(name).entry_points:
            if ep.group == "console_scripts":
                ours.setdefault(ep.name, ep.value)
    return ours


@pytest.mark.parametrize("command", all_commands(), ids=str)
def test_every_program_is_a_console_script_or_python(command: Command) -> None:
    program = command.argv[0]
    if program == "python":
        return
    scripts = console_scripts()
    assert program in scripts, f"{command}: {program} is no console script of the project"
    installed = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert installed[program].value == scripts[program]
    installed[program].load()


@pytest.mark.parametrize("command", all_commands(), ids=str)
def test_every_python_module_exists_and_answers_help(command: Command) -> None:
    argv = command.argv
    if argv[0] != "python":
        return
    if argv[1] == "-c":
        compile(argv[2], str(command), "exec")
        return
    assert argv[1] == "-m", command
    assert find_spec(argv[2]) is not None, f"{command}: no module {argv[2]}"
    result = subprocess.run(
        [sys.executable, "-m", argv[2], "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("command", "cli"), cli_commands(), ids=lambda x: str(x) if isinstance(x, Command) else ""
)
def test_every_subcommand_and_option_exists(command: Command, cli: Cli) -> None:
    """``--help`` of the exact subcommand through the installed entry point: the ``-A``
    module imports, the subcommand exists, and every option used is one it lists."""
    if cli.program == "celery":
        assert cli.app, f"{command}: celery without -A"
    help_text = run_help((cli.program, *cli.before, *cli.path))
    if cli.path == ("flower",) or cli.path[-1:] == ("flower",):
        known = {f"--{name}" for name in flower_options()} | {"--help"}
        for flag in option_flags(cli.options):
            assert flag.replace("_", "-") in known, f"{command}: Flower has no {flag}"
        return
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))
    for flag in option_flags(cli.options):
        assert flag in listed, f"{command}: {flag} is not an option of {' '.join(cli.path)}"


def test_celery_sagas_is_registered_as_a_celery_subcommand() -> None:
    assert "Commands:" in run_help(("celery", "-A", "workers.app", "sagas"))


def test_the_commands_are_the_documented_ones() -> None:
    for command in all_commands():
        if "healthcheck" in command.origin or command.argv[:2] == ("python", "-c"):
            continue
        text = shlex.join(command.argv)
        assert any(text == d or text.startswith(d + " ") for d in DOCUMENTED), str(command)
    readme = ROOT / "README.md"
    if readme.exists():
        missing = [d for d in DOCUMENTED[:5] if d not in readme.read_text()]
        assert not missing, f"README.md does not document {missing}"


def test_compose_and_procfile_run_the_same_processes() -> None:
    def shapes(origin_prefix: str) -> set[tuple[str, ...]]:
        return {
            (
                cli.program,
                cli.app or "",
                *cli.path,
                *(o for o in cli.options if o in ("-Q", "sagas.dlq")),
            )
            for command, cli in cli_commands()
            if command.origin.startswith(origin_prefix) and "healthcheck" not in command.origin
        }

    assert shapes("compose") == shapes("Procfile")


# --------------------------------------------------------------------------- environment


def code_text() -> str:
    sources = [*ROOT.glob("celery_sagas/**/*.py"), *ROOT.glob("workers/**/*.py")]
    return "\n".join(path.read_text() for path in sources)


def read_by_code(name: str) -> bool:
    if f'"{name}"' in code_text() or f"'{name}'" in code_text():
        return True
    settings = {f"SAGAS_{f.name.upper()}" for f in fields(SagaSettings)}
    if name in settings:  # SagaSettings.from_config reads SAGAS_<FIELD>
        return True
    if name.startswith("FLOWER_"):  # Flower reads FLOWER_<OPTION> itself
        return name[len("FLOWER_") :].lower().replace("_", "-") in flower_options()
    return False


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def interpolated(text: str) -> set[str]:
    return set(re.findall(r"(?<!\$)\$\{?([A-Z_][A-Z0-9_]*)", text))


def test_every_variable_our_services_get_is_read_by_the_code() -> None:
    for name, service in app_services().items():
        for variable in environment(service):
            assert read_by_code(variable), f"compose {name}: nothing reads {variable}"
        if service.get("env_file"):
            for variable in env_example():
                assert read_by_code(variable) or variable in interpolated(
                    (ROOT / "docker-compose.yml").read_text()
                ), f".env.example: nothing reads {variable}"


def test_every_variable_in_commands_is_known() -> None:
    text = (ROOT / "Procfile").read_text()
    for service in app_services().values():
        text += "\n" + str(service.get("command", "")) + str(service.get("healthcheck", ""))
    for variable in interpolated(text.replace("$$", "$")):
        assert variable in PLATFORM_VARS or read_by_code(variable), variable


def test_every_interpolated_variable_is_in_env_example() -> None:
    needed = interpolated((ROOT / "docker-compose.yml").read_text())
    assert needed <= env_example().keys(), sorted(needed - env_example().keys())


def test_database_urls_use_psycopg2() -> None:
    urls = {n: environment(s).get("SAGAS_DATABASE_URL") for n, s in app_services().items()}
    assert all(urls.values()), f"services without SAGAS_DATABASE_URL: {urls}"
    for name, url in urls.items():
        assert url is not None and url.startswith(PSYCOPG2), f"{name}: {url}"
    for value in env_example().values():
        assert not value.startswith(("postgresql://", "postgres://")), value


def test_flower_basic_auth_comes_from_the_env_file_only() -> None:
    for command in all_commands():
        joined = " ".join(command.argv).lower()
        assert "basic-auth" not in joined and "basic_auth" not in joined, str(command)
    assert "basic" not in (ROOT / "Procfile").read_text().lower()
    flowers = [s for s in app_services().values() if "flower" in str(s.get("command"))]
    assert len(flowers) == 1
    assert "FLOWER_BASIC_AUTH" not in environment(flowers[0])
    env_files = flowers[0]["env_file"]
    assert ".env" in ([env_files] if isinstance(env_files, str) else env_files)
    user, _, password = env_example()["FLOWER_BASIC_AUTH"].partition(":")
    assert user and password


# --------------------------------------------------------------------------- topology


def is_beat(cli: Cli) -> bool:
    return cli.program == "celery" and cli.path[:1] == ("beat",)


def test_exactly_one_beat() -> None:
    beats = {c.origin for c, cli in cli_commands() if is_beat(cli)}
    assert beats == {"compose beat", "Procfile beat"}
    beat = services()["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    for command, cli in cli_commands():
        if cli.path[:1] == ("worker",):
            assert not {"-B", "--beat"} & set(cli.options), f"{command}: a worker runs beat"


def test_depends_on_and_healthchecks_are_sane() -> None:
    everything = services()
    for name, service in everything.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in everything, f"{name} depends on unknown {target}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in everything[target], f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert everything[target].get("restart") == "no", f"{target} is not one-shot"
    for name, service in app_services().items():
        needs = service.get("depends_on", {})
        assert needs["postgres"]["condition"] == "service_healthy", name
        if name != "migrate":
            assert needs["redis"]["condition"] == "service_healthy", name
            assert needs["migrate"]["condition"] == "service_completed_successfully", name
    _assert_no_cycle(everything)


def _assert_no_cycle(everything: dict[str, dict[str, Any]]) -> None:
    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"depends_on cycle: {' -> '.join((*trail, name))}"
        for target in everything[name].get("depends_on", {}):
            visit(target, (*trail, name))

    for name in everything:
        visit(name, ())


def test_one_image_built_from_the_repository() -> None:
    for name, service in app_services().items():
        assert service.get("build") == ".", name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    extras = re.search(r'pip install "\.\[([^\]]+)\]"', dockerfile)
    assert extras, "the Dockerfile installs the project with its extras"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras.group(1).split(",")) <= declared["optional-dependencies"].keys()
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE):
        if "*" not in copied:
            assert (ROOT / copied).exists(), f"Dockerfile copies missing {copied}"


def test_prometheus_loads_the_config_and_alerts_and_scrapes_the_exporter() -> None:
    prometheus = services()["prometheus"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"]}
    for source in mounted:
        assert (ROOT / source).exists(), source
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    assert "--config.file=" + mounted["./prometheus/prometheus.yml"] in prometheus["command"]
    config_dir = Path(mounted["./prometheus/prometheus.yml"]).parent
    for rule_file in config["rule_files"]:
        assert str(config_dir / rule_file) in mounted.values(), rule_file
    metrics = parse_cli(tuple(services()["metrics"]["command"]))
    port = metrics.options[metrics.options.index("--port") + 1]
    targets = {
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    }
    assert f"metrics:{port}" in targets
    assert f"{port}:{port}" in services()["metrics"]["ports"]


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_idempotent(tmp_path: Path) -> None:
    env = {**subprocess_env(), "SAGAS_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"}

    def run() -> str:
        result = subprocess.run(
            [sys.executable, "-m", "workers.bootstrap"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    first, second = run(), run()
    assert "seeded demo stock" in first
    assert "not seeded" in second and "seeded demo stock" not in second
    assert "saga schema at revision" in second


# --------------------------------------------------------------------------- grafana


def grafana_dashboard() -> dict[str, Any]:
    import json

    return dict(json.loads((ROOT / "grafana/dashboards/celery-sagas.json").read_text()))


def _exported_names() -> frozenset[str]:
    from tests.unit.test_alert_rules import exported

    return exported()


def test_grafana_is_provisioned_next_to_prometheus() -> None:
    grafana = services()["grafana"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    for source in mounted:
        assert (ROOT / source).exists(), source
    assert mounted["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounted["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    provider = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/celery-sagas.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == mounted["./grafana/dashboards"]
    (source,) = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    prometheus_port = services()["prometheus"]["ports"][0].split(":")[-1].strip('"')
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_started"
    datasource_uids = {
        p["datasource"]["uid"] for p in grafana_dashboard()["panels"] if p.get("datasource")
    }
    assert datasource_uids == {source["uid"]}
    password = environment(grafana)["GF_SECURITY_ADMIN_PASSWORD"]
    assert interpolated(password) == {"GRAFANA_ADMIN_PASSWORD"}


REQUIRED_PANELS = {
    "Sagas per state": "celery_sagas_in_state",
    "Throughput: sagas started per second": "celery_sagas_started_total",
    "Outcomes per second": "celery_sagas_completed_total",
    "Saga duration percentiles (completed)": "celery_sagas_duration_seconds_bucket",
    "Stuck sagas": "celery_sagas_stuck",
    "DLQ depth": "celery_sagas_dlq_depth",
}


def test_every_grafana_query_names_a_metric_the_exporter_serves() -> None:
    from tests.unit.test_alert_rules import metric_names

    exported = _exported_names()
    panels = grafana_dashboard()["panels"]
    assert panels, "the dashboard has no panels"
    by_title = {p["title"]: p for p in panels}
    for title, metric in REQUIRED_PANELS.items():
        assert metric in str(by_title[title]["targets"]), title
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"].replace("$saga", "x")
            used = metric_names(expr)
            assert used, f"{panel['title']}: no metric in {expr}"
            assert used <= exported, f"{panel['title']}: unknown {sorted(used - exported)}"
    variable = grafana_dashboard()["templating"]["list"][0]
    found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
    assert found and found.group(1) in exported, variable["definition"]
    assert found.group(2) == variable["name"] == "saga"


def test_grafana_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in grafana_dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
