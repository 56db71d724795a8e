"""The analysis service's tests build its own settings: ``settings`` as that program reads it."""

import pytest

from shared.settings import AnalysisSettings, ServiceSettings
from tests.support.settings import for_program


@pytest.fixture
def settings(settings: ServiceSettings) -> AnalysisSettings:
    """What ``pulsecal-analysis`` reads where the service read ``settings``."""
    return for_program(AnalysisSettings, settings)
