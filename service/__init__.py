"""The PulseCal ingestion service and its command-line tools."""
