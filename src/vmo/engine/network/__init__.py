"""Networking of the embedded engine: layer-2 bridges and taps, host-local IPAM, the Service proxy
and the Endpoints controller."""
