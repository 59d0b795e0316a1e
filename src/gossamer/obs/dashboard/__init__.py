"""The live dashboard: a web page of the swarm's peers, links, curves and events.

The page reads the swarm through a :class:`SwarmSource` (a snapshot of peers and their metric
samples); :class:`DashboardService` polls it into a bounded :class:`SwarmHistory`, and
:func:`create_app` serves the page and ``/api/state``.
"""

from gossamer.obs.dashboard.app import DashboardConfig, DashboardService, create_app
from gossamer.obs.dashboard.fake import FakeSwarmSource
from gossamer.obs.dashboard.history import HistoryConfig, SwarmEvent, SwarmHistory
from gossamer.obs.dashboard.scrape import ScrapeConfig, ScrapeSwarmSource
from gossamer.obs.dashboard.server import DashboardServer
from gossamer.obs.dashboard.source import PeerSample, PeerView, SwarmSnapshot, SwarmSource

__all__ = [
    "DashboardConfig",
    "DashboardServer",
    "DashboardService",
    "FakeSwarmSource",
    "HistoryConfig",
    "PeerSample",
    "PeerView",
    "ScrapeConfig",
    "ScrapeSwarmSource",
    "SwarmEvent",
    "SwarmHistory",
    "SwarmSnapshot",
    "SwarmSource",
    "create_app",
]
