"""Node storage for the embedded engine: the volume pool, DataVolume imports, uploads, VMI volumes."""
