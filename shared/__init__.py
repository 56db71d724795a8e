"""Code both PulseCal processes use: settings, Redis key names, wire formats."""
