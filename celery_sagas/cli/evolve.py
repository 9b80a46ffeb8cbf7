"""``celery-sagas migrate-sagas``: move running sagas onto another version of their
definition (``celery_sagas.evolution``), at a step boundary, audited."""

from __future__ import annotations

from typing import Any

import click

from celery_sagas import evolution
from celery_sagas.cli.context import context_of
from celery_sagas.cli.failures import CommandError
from celery_sagas.cli.render import emit_json
from celery_sagas.definition import Saga


def _version(runtime: Any, name: str, version: int) -> Saga:
    """The installed definition of ``name`` at ``version`` (0: the unversioned one)."""
    installed: list[Saga] = [s for s in runtime.sagas.versions.values() if s.name == name]
    for saga in installed:
        if (saga.version or 0) == version:
            return saga
    have = sorted(s.version or 0 for s in installed)
    raise CommandError(
        "not_found",
        f"the app has no version {version} of {name!r} installed (it has {have or 'none'}): "
        "install both versions in the app, e.g. install(app, [order_v1, order_v2])",
    )


def _mapping(pairs: tuple[str, ...]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"{pair!r}: expected old_step=new_step", param_hint="--map")
        mapping[old] = new
    return mapping


@click.command(
    "migrate-sagas",
    help="Move waiting sagas of NAME from one version of its definition to another, at a "
    "step boundary (their current step sent but not begun): completed steps are carried "
    "over by name (--map renames them), the current step is sent again under the new "
    "version. Every move is audited in the saga's log. Version 0 is the unversioned "
    "definition. Needs --app.",
)
@click.argument("name")
@click.option("--from", "from_version", type=click.IntRange(min=0), required=True)
@click.option("--to", "to_version", type=click.IntRange(min=0), required=True)
@click.option("--map", "pairs", multiple=True, metavar="OLD=NEW", help="Rename a step.")
@click.option("--dry-run", is_flag=True, help="Say what would move; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def migrate_sagas_command(
    ctx: click.Context,
    name: str,
    from_version: int,
    to_version: int,
    pairs: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
) -> None:
    context = context_of(ctx)
    runtime = context.runtime
    source = _version(runtime, name, from_version)
    target = _version(runtime, name, to_version)
    report = evolution.migrate_sagas(
        runtime.coordinator, source, target, _mapping(pairs), context.actor(), dry_run
    )
    if report.messages:
        runtime.publish(report.messages)
    if as_json:
        emit_json(
            {
                "dry_run": dry_run,
                "moved": [vars(m) for m in report.moved],
                "skipped": [vars(s) for s in report.skipped],
            }
        )
        return
    verb = "would move" if dry_run else "moved"
    for move in report.moved:
        click.echo(f"{verb} {move.saga_id} ({move.business_key}) at {move.step}")
    for skip in report.skipped:
        click.echo(f"left {skip.saga_id} ({skip.business_key}): {skip.reason}")
    click.echo(f"{verb} {len(report.moved)}, left {len(report.skipped)}", err=True)
