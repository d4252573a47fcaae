"""``videoconsult user``: professional accounts, for the operator.

The same operations as the admin API, recorded in the access log with the
actor "operator" and client type "cli".
"""

from __future__ import annotations

import argparse
import asyncio

from sqlalchemy.ext.asyncio import AsyncConnection

from audit.access_log import Actor
from audit.accounts import (
    Account,
    find_account_by_email,
    get_organisation_by_name,
    list_accounts,
    normalise_email,
    parse_role,
)
from audit.clock import SystemClock
from audit.errors import InvalidValue, NotFound
from audit.roles import ROLE_NAMES
from config import Settings
from server.auth.admin import (
    AccountChange,
    EnrolmentInvitation,
    add_account,
    change_account,
    change_role,
    reset_account_totp,
)
from server.cli.base import CliError, current_database, operator_read, public_origin


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "user",
        help="manage professional accounts",
        description="Manage professional accounts (therapists, support staff, admins).",
    )
    commands = parser.add_subparsers(title="user commands", metavar="USER_COMMAND", required=True)

    add = commands.add_parser(
        "add",
        help="create an account and print its one-time enrolment link",
        description="Create an account and print its one-time enrolment link (shown once).",
    )
    add.add_argument("--org", required=True, help="the organisation's name")
    add.add_argument("--role", required=True, choices=ROLE_NAMES)
    add.add_argument("--email", required=True, help="the login name")
    add.set_defaults(run=run_add)

    listing = commands.add_parser(
        "list", help="list an organisation's accounts", description="List the accounts."
    )
    listing.add_argument("--org", required=True, help="the organisation's name")
    listing.set_defaults(run=run_list)

    for change, text in (
        (AccountChange.DISABLE, "disable an account and end its sessions"),
        (AccountChange.ENABLE, "enable a disabled account"),
    ):
        command = commands.add_parser(change.value, help=text, description=text.capitalize() + ".")
        command.add_argument("email")
        command.set_defaults(run=run_change, change=change)
    reset = commands.add_parser(
        "reset-totp",
        help="forget the TOTP app; print a link to connect a new one (the password stays)",
        description=(
            "Forget the account's TOTP app and end its sessions; print a link that "
            "connects a new app. The account keeps its password, and the link asks for it."
        ),
    )
    reset.add_argument("email")
    reset.set_defaults(run=run_reset_totp, password_too=False)
    full = commands.add_parser(
        "reset",
        help="forget password and TOTP app; print a link for the account holder only",
        description=(
            "Forget the account's password and TOTP app and end its sessions; print a "
            "link that sets both anew. Whoever holds the link can become the account: "
            "hand it to the account holder yourself, never to someone else (an admin "
            "included)."
        ),
    )
    full.add_argument("email")
    full.set_defaults(run=run_reset_totp, password_too=True)

    set_role = commands.add_parser(
        "set-role", help="change an account's role", description="Change an account's role."
    )
    set_role.add_argument("email")
    set_role.add_argument("role", choices=ROLE_NAMES)
    set_role.set_defaults(run=run_set_role)


def _print_invitation(settings: Settings, invitation: EnrolmentInvitation) -> None:
    origin, source = public_origin(settings)
    print(f"account {invitation.account.email} ({invitation.account.role.value}) is ready to enrol")
    print(f"enrolment link (shown once, valid until {invitation.expires_at:%Y-%m-%d %H:%M} UTC):")
    print(f"  {origin}/enrol/{invitation.token}")
    if source == "serve":
        print(
            "  (server.public_url is not set: the link uses where `videoconsult serve` "
            "listens now; others reach it only if that address is theirs too)"
        )
    elif source == "settings":
        print(
            "  (server.public_url is not set and no server runs on this data directory: "
            f"the link assumes {origin}; set VIDEOCONSULT_SERVER_PUBLIC_URL to the "
            "address people open)"
        )


def _email(raw: str) -> str:
    try:
        return normalise_email(raw)
    except InvalidValue as err:
        raise CliError(str(err)) from None


async def _account(conn: AsyncConnection, email: str) -> Account:
    account = await find_account_by_email(conn, _email(email))
    if account is None:
        raise CliError(f"no account with the e-mail address {email!r}")
    return account


def run_add(settings: Settings, args: argparse.Namespace) -> int:
    async def _add() -> EnrolmentInvitation:
        async with current_database(settings) as engine, engine.begin() as conn:
            try:
                organisation = await get_organisation_by_name(conn, args.org)
            except NotFound as err:
                raise CliError(f"{err}: add it with `videoconsult org add`") from None
            return await add_account(
                conn,
                Actor.operator(),
                organisation_id=organisation.id,
                email=args.email,
                role=parse_role(args.role),
                now=SystemClock().now(),
                link_ttl_s=settings.accounts.enrolment_link_ttl_s,
            )

    _print_invitation(settings, asyncio.run(_add()))
    return 0


def run_list(settings: Settings, args: argparse.Namespace) -> int:
    async def _list() -> list[Account]:
        async with current_database(settings) as engine:
            _, accounts = await operator_read(
                engine,
                args.org,
                lambda conn, organisation: list_accounts(conn, organisation.id),
                action="account.list",
            )
            return accounts

    for account in asyncio.run(_list()):
        print(f"{account.id}  {account.role.value:<9}  {account.status.value:<9}  {account.email}")
    return 0


def run_change(settings: Settings, args: argparse.Namespace) -> int:
    async def _change() -> Account:
        async with current_database(settings) as engine, engine.begin() as conn:
            account = await _account(conn, args.email)
            return await change_account(
                conn, Actor.operator(), account, args.change, now=SystemClock().now()
            )

    changed = asyncio.run(_change())
    print(f"account {changed.email} is now {changed.status.value}")
    return 0


def run_reset_totp(settings: Settings, args: argparse.Namespace) -> int:
    async def _reset() -> EnrolmentInvitation:
        async with current_database(settings) as engine, engine.begin() as conn:
            account = await _account(conn, args.email)
            return await reset_account_totp(
                conn,
                Actor.operator(),
                account,
                now=SystemClock().now(),
                link_ttl_s=settings.accounts.enrolment_link_ttl_s,
                password_too=args.password_too,
            )

    invitation = asyncio.run(_reset())
    _print_invitation(settings, invitation)
    if invitation.account.password_hash is None:
        # --password-too, or an account that never chose one (not enrolled yet).
        print("  this link sets a new password: give it to the account holder only")
    else:
        print("  the account keeps its password: the link asks for it")
    return 0


def run_set_role(settings: Settings, args: argparse.Namespace) -> int:
    async def _set() -> Account:
        async with current_database(settings) as engine, engine.begin() as conn:
            account = await _account(conn, args.email)
            return await change_role(
                conn, Actor.operator(), account, parse_role(args.role), now=SystemClock().now()
            )

    changed = asyncio.run(_set())
    print(f"account {changed.email} now has the role {changed.role.value}")
    return 0
