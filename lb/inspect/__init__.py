"""What the kernel and the daemon are doing, as plain data.

The API under `lb status`, `lb vips`, `lb targets`, `lb maps`, `lb conntrack`,
`lb stats` and `lb explain`: every function takes the config and returns
JSON-able dicts and lists whose keys are a stable schema, written down in
each docstring (keys are only ever added). Addresses are strings, endpoints
"ADDRESS:PORT", durations seconds (floats), missing values None.

Where the answers come from:

- kernel state (VIPs, rings, targets, conntrack, counters) from the maps
  pinned under /sys/fs/bpf/lb/<name>/, opened with libbpf and no compiler,
  so they work whether the daemon runs or not;
- target health from the daemon's admin socket: only the daemon checks
  targets; without it, the config's targets are listed with state "unknown";
- rules (`explain_http`) from the config alone.

Errors a user can cause raise InspectError with a message to print: not root
("... needs root: run with sudo"), nothing pinned ("nothing loaded for
<name>: is lb up?"), an unknown group, map, listener or a malformed address.

Modules by concern: `access` (root, the pinned maps, the admin socket),
`names` (how the config names kernel entries; endpoints a user types),
`runtime` (`lb status`, `lb targets`), `kernel` (`lb vips`,
`lb conntrack`, `lb stats`), `maps` (`lb maps`) and `explain`
(`lb explain`, the flow hash).
"""

from lb.inspect.access import InspectError, open_maps, require_root
from lb.inspect.explain import explain_flow, explain_http, flow_hash
from lb.inspect.kernel import conntrack, stats, stats_rates, vips
from lb.inspect.maps import COUNT_CAP, maps_dump, maps_list
from lb.inspect.names import parse_endpoint
from lb.inspect.runtime import attached_interfaces, pinned_program, status, targets

__all__ = [
    "COUNT_CAP", "InspectError", "attached_interfaces", "conntrack", "explain_flow", "explain_http", "flow_hash",
    "maps_dump", "maps_list", "open_maps", "parse_endpoint", "pinned_program", "require_root", "stats",
    "stats_rates", "status", "targets", "vips",
]
