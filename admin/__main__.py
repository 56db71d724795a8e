"""``pulsecal-admin``: schema migrations and device registration."""

import argparse
import asyncio
import os
import re
import sys

import psycopg

from shared.cli import program_parser
from shared.devices import (
    DeviceExistsError,
    DeviceNotFoundError,
    add_device,
    list_devices,
    revoke_device,
)
from shared.schema import upgrade_schema
from shared.settings import AdminSettings, load_settings_or_exit
from shared.wire import DEVICE_ID_PATTERN

__all__ = ("main",)


def _parser() -> argparse.ArgumentParser:
    parser = program_parser("pulsecal-admin", __doc__ or "", AdminSettings)
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="create or migrate the schema (idempotent)")

    device = commands.add_parser("device", help="registered devices")
    device_commands = device.add_subparsers(dest="device_command", required=True)
    add = device_commands.add_parser(
        "add", help="register a device; its token is the last line of output"
    )
    add.add_argument("device_id")
    add.add_argument(
        "--rotate",
        action="store_true",
        help="issue a new token for a device that already exists (the old one stops working)",
    )
    revoke = device_commands.add_parser("revoke", help="revoke a device's token")
    revoke.add_argument("device_id")
    device_commands.add_parser("list", help="list devices")
    return parser


async def _run(args: argparse.Namespace, database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        if args.command == "db":
            applied = await upgrade_schema(conn)
            print(f"schema up to date (applied: {', '.join(map(str, applied)) or 'none'})")
            return 0
        if args.device_command == "add":
            if re.fullmatch(DEVICE_ID_PATTERN, args.device_id) is None:
                print(f"invalid device id {args.device_id!r}", file=sys.stderr)
                return 2
            try:
                token = await add_device(conn, args.device_id, rotate=args.rotate)
            except DeviceExistsError:
                print(
                    f"device {args.device_id} already exists (use --rotate for a new token)",
                    file=sys.stderr,
                )
                return 1
            print(f"device {args.device_id} registered; token (shown once):")
            print(token)
            return 0
        if args.device_command == "revoke":
            try:
                await revoke_device(conn, args.device_id)
            except DeviceNotFoundError:
                print(f"no device {args.device_id}", file=sys.stderr)
                return 1
            print(f"device {args.device_id} revoked")
            return 0
        for device in await list_devices(conn):
            state = "revoked " + device.revoked_at.isoformat() if device.revoked_at else "active"
            print(f"{device.device_id}\t{device.created_at.isoformat()}\t{state}")
        return 0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = load_settings_or_exit(os.environ, AdminSettings)
    try:
        code = asyncio.run(_run(args, settings.database_url))
    except psycopg.OperationalError as e:
        print(f"pulsecal-admin: cannot reach the database: {e}".strip(), file=sys.stderr)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
