"""The runtime every long-running program shares: starting, serving and stopping it
(``serving``), its clients (``clients``), its probes (``probes``) and its heartbeat loop
(``heartbeat``).

Import from the modules: ``shared/appkeys.py`` reads ``probes``' type, and ``serving`` and
``clients`` read ``shared/appkeys.py``'s keys, so this package imports none of them itself.
"""
