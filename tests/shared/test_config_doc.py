"""docs/configuration.md is what the settings classes say, generated rather than kept by hand."""

from shared.settings import REGENERATE, configuration_markdown, variables
from tests.support.paths import ROOT_DIR

DOC = ROOT_DIR / "docs" / "configuration.md"


def test_the_committed_reference_matches_the_settings_classes() -> None:
    committed = DOC.read_text()

    assert committed == configuration_markdown(), (
        f"docs/configuration.md is out of date: run `{REGENERATE}` and commit it"
    )


def test_the_reference_documents_every_variable_once() -> None:
    text = configuration_markdown()

    for variable in variables():
        assert text.count(f"| `{variable.name}` |") == 1, variable.name
