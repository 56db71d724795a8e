"""The PulseCal sidecar: metrics and aggregated health from a pod's telemetry."""
