"""Configuration has one source of truth: every setting is described, and the docs are generated from it."""

from __future__ import annotations

from pathlib import Path

from pipeline.configdoc import README_END, README_START, config_toml, fields, reference_table
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
REGENERATE = "run `python -m pipeline.configdoc --write` after changing pipeline/settings.py"


def test_every_setting_has_a_description() -> None:
    missing = [f"{s}.{k}" for s, k, info in fields() if not (info.description or "").strip()]
    assert not missing, missing


def test_readme_reference_is_generated_from_settings() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0]
    assert block.strip() == reference_table().strip(), REGENERATE


def test_config_toml_is_generated_from_settings_and_loads_to_the_defaults() -> None:
    assert (REPO / "config.toml").read_text() == config_toml(), REGENERATE
    assert load_settings(REPO / "config.toml") == Settings()
