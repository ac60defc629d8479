"""The four services by name, in start-up order."""

from __future__ import annotations

from libs.common.service import ServiceSpec
from services.campaigns.app import SPEC as CAMPAIGNS
from services.ingest.app import SPEC as INGEST
from services.lifecycle.app import SPEC as LIFECYCLE
from services.notifier.app import SPEC as NOTIFIER

SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec for spec in (INGEST, LIFECYCLE, CAMPAIGNS, NOTIFIER)
}
