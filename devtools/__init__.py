"""Development tools: the device simulator (``pulsecal-sim``) and the local stack (``make run``).

Installed as the ``pulsecal-devtools`` distribution, never into the image.
"""
