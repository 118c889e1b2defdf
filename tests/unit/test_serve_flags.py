"""`router serve --help` is where the README sends users for every setting: each flag is there
with its description, on/off flags included."""

from __future__ import annotations

import argparse

from router.cli import _settings_flags
from router.serving.config import ServeSettings


def test_every_setting_has_a_flag_with_its_description() -> None:
    parser = argparse.ArgumentParser()
    _settings_flags(parser)
    helps = {a.dest: a.help for a in parser._actions}
    for name, field in ServeSettings.model_fields.items():
        assert field.description, name
        assert helps.get(name) == field.description, name
