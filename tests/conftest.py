"""Shared fixtures. Lab tests need root and network namespaces; elsewhere they skip with that reason."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tcppunch.lab import LabError
from tcppunch.lab.netns import check_supported

# Hypothesis' speed checks (the too_slow health check, the per-example deadline) fail on a loaded 2-core
# machine (another test's lab traffic, a cold start with no example database) without saying anything
# about the code; speed is measured by scripts/, not asserted in tests. Every property still runs its
# full number of examples.
settings.register_profile("tcppunch", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("tcppunch")


# Identities and known-peers files of the tests, and of every process they start (which inherits the
# environment), live in a throw-away directory, never in the user's ~/.config/tcppunch. Set at import,
# before any test module copies os.environ into the environment of its processes.
_CONFIG_HOME = tempfile.mkdtemp(prefix="tcppunch-test-config-")
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME


@pytest.fixture(autouse=True, scope="session")
def _private_config_home() -> Iterator[None]:
    yield
    shutil.rmtree(_CONFIG_HOME, ignore_errors=True)


def _lab_unsupported_reason() -> str | None:
    try:
        check_supported()
    except LabError as exc:
        return str(exc)
    return None


LAB_UNSUPPORTED = _lab_unsupported_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LAB_UNSUPPORTED is None:
        return
    if os.environ.get("CI") == "true":
        # CI runs as root on a machine that has everything: a lab that cannot run there is a failure.
        raise pytest.UsageError(f"CI cannot run the NAT lab tests: {LAB_UNSUPPORTED}")
    skip = pytest.mark.skip(reason=f"NAT lab unavailable: {LAB_UNSUPPORTED}")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)
