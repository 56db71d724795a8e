"""``python -m devtools.devstack`` (``make run``): the whole stack from one command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Port 1 never answers: devstack must start its own throwaway Redis and Postgres on free
# ports, never touching the machine's servers on 6379 and 5432.
DEAD_REDIS = "redis://127.0.0.1:1/0"
DEAD_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"


@pytest.mark.timeout(180)
def test_devstack_starts_throwaway_servers_and_simulated_batches_are_acked() -> None:
    env = {**os.environ, "REDIS_URL": DEAD_REDIS, "DATABASE_URL": DEAD_POSTGRES}
    env.pop("PORT", None)

    result = subprocess.run(
        [sys.executable, "-m", "devtools.devstack", "--duration=8", "--devices=2", "--port=0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("starting a throwaway one") == 2, output
    summary = re.search(r"^pulsecal-sim summary: .* acked=(\d+) ", result.stdout, re.MULTILINE)
    assert summary is not None, output
    assert int(summary.group(1)) > 0, output
    for stopped in ("simulator (exit 0)", "service (exit 0)", "postgres", "redis"):
        assert f"devstack: stopped {stopped}" in output, output
    devices_file = re.search(r"tokens in (\S+)", output)
    assert devices_file is not None, output
    assert not Path(devices_file.group(1)).parent.exists(), "the temporary directory is left"
