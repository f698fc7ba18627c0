"""Session-scoped real SLURM cluster (slurmctld + slurmd + munged on this machine).

Run the SLURM tests alone with::

    python -m pytest tests/integration/slurm -q

They need root (apt-get install of Debian's slurmctld/slurmd/munge/slurm-client when missing, daemons
run as root). They are skipped only when apt-get itself is unavailable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.slurm.harness import SlurmCluster, SlurmUnavailable, install


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        install()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    cluster = SlurmCluster(root=tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
