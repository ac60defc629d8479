"""Who is who: resolving a platform id, phone or email to one customer, merging profiles
that turn out to be one person.

A customer's id is the platform's customer id when there is one, else the normalised phone,
else the email. When an event shows identities together (an order with a platform id and a
phone that a guest checkout used before), their profiles are merged into one, the platform
id's. Two different platform ids are never merged, even when they share a phone (families
share phones); the phone keeps pointing to its first owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import String, and_, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.common.db.dialect import upsert
from libs.common.db.keysets import rows_of
from services.lifecycle.models import customer_identities

IdentityKey = tuple[str, str, str]
"""(shop_id, kind, value) with kind `id`, `phone` or `email`."""


@dataclass(frozen=True)
class Identity:
    shop_id: str
    platform_id: str | None
    phone: str | None
    email: str | None

    def identity_keys(self) -> list[IdentityKey]:
        pairs = (("id", self.platform_id), ("phone", self.phone), ("email", self.email))
        return [(self.shop_id, kind, value) for kind, value in pairs if value]


@dataclass
class IdentityResolver:
    """Resolves identities over one batch, starting from what the database knows."""

    owners: dict[IdentityKey, str]
    merged: dict[tuple[str, str], str] = field(default_factory=dict)
    """(shop_id, loser) → winner for merges found in this batch."""
    changed: set[IdentityKey] = field(default_factory=set)

    @classmethod
    async def load(cls, conn: AsyncConnection, identities: Iterable[Identity]) -> IdentityResolver:
        keys = list({key for identity in identities for key in identity.identity_keys()})
        owners: dict[IdentityKey, str] = {}
        if not keys:
            return cls(owners)
        # One statement: the owner of each identity, and (to know whether that owner is a
        # platform customer, which decides merges) the owner's own platform-id identity.
        found = customer_identities.alias("found")
        platform = customer_identities.alias("platform")
        wanted = rows_of(
            conn, "wanted", [("shop_id", String()), ("kind", String()), ("value", String())], keys
        )
        rows = await conn.execute(
            select(
                found.c.shop_id,
                found.c.kind,
                found.c.value,
                found.c.customer_id,
                platform.c.customer_id.label("platform_owner"),
            ).select_from(
                found.join(
                    wanted,
                    and_(
                        found.c.shop_id == wanted.c.shop_id,
                        found.c.kind == wanted.c.kind,
                        found.c.value == wanted.c.value,
                    ),
                ).outerjoin(
                    platform,
                    and_(
                        platform.c.shop_id == found.c.shop_id,
                        platform.c.kind == literal_column("'id'"),
                        platform.c.value == found.c.customer_id,
                    ),
                )
            )
        )
        for r in rows:
            owners[(r.shop_id, r.kind, r.value)] = r.customer_id
            if r.platform_owner is not None:
                owners[(r.shop_id, "id", r.customer_id)] = r.platform_owner
        return cls(owners)

    def final(self, shop_id: str, customer_id: str) -> str:
        """Follow merges to the surviving profile."""
        while (shop_id, customer_id) in self.merged:
            customer_id = self.merged[(shop_id, customer_id)]
        return customer_id

    def _is_platform(self, shop_id: str, customer_id: str) -> bool:
        return (shop_id, "id", customer_id) in self.owners

    def resolve(self, identity: Identity) -> str:
        """The customer these identities belong to, merging profiles they join."""
        shop = identity.shop_id
        owners = list(
            dict.fromkeys(
                self.final(shop, self.owners[key])
                for key in identity.identity_keys()
                if key in self.owners
            )
        )
        if identity.platform_id:
            target = self.final(
                shop, self.owners.get((shop, "id", identity.platform_id), identity.platform_id)
            )
        else:
            platform_owners = [o for o in owners if self._is_platform(shop, o)]
            target = (platform_owners or owners or [identity.phone or identity.email or ""])[0]
        for owner in owners:
            if owner != target and not (
                self._is_platform(shop, owner) and self._is_platform_target(shop, target, identity)
            ):
                self.merged[(shop, owner)] = target
        for key in identity.identity_keys():
            current = self.owners.get(key)
            keep_other = (
                current is not None
                and self.final(shop, current) != target
                and self._is_platform(shop, self.final(shop, current))
            )
            if not keep_other and current != target:
                self.owners[key] = target
                self.changed.add(key)
        return target

    def _is_platform_target(self, shop: str, target: str, identity: Identity) -> bool:
        return bool(identity.platform_id) or self._is_platform(shop, target)

    async def save(self, conn: AsyncConnection) -> None:
        """Write new and reassigned identities (merged owners are rewritten to winners)."""
        rows = [
            {
                "shop_id": s,
                "kind": k,
                "value": v,
                "customer_id": self.final(s, self.owners[(s, k, v)]),
            }
            for s, k, v in self.changed
        ]
        for (shop, loser), _winner in self.merged.items():
            rows.extend(
                {"shop_id": s, "kind": k, "value": v, "customer_id": self.final(s, owner)}
                for (s, k, v), owner in self.owners.items()
                if s == shop and owner == loser and (s, k, v) not in self.changed
            )
        if rows:
            await conn.execute(
                upsert(conn, customer_identities, ["shop_id", "kind", "value"], ["customer_id"]),
                _unique(rows),
            )

    def merges(self) -> list[tuple[str, str, str]]:
        """(shop_id, loser, winner) for every profile merged away in this batch."""
        return [(s, loser, self.final(s, loser)) for (s, loser) in self.merged]


def _unique(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """One row per identity, in key order: two transactions writing some of the same
    identities (a batch redelivered to a partition's new owner while the old one still
    applies it) then lock them in the same order and one waits for the other, where rows
    in set order deadlocked them (PostgreSQL breaks a deadlock only after a second)."""
    unique = {(r["shop_id"], r["kind"], r["value"]): r for r in rows}
    return [unique[key] for key in sorted(unique)]
