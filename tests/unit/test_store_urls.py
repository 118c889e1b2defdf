"""Where `--spend-store` and `--feedback-store` point: what each form means and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.core.feedback_store import StoreError, sqlite_path
from router.serving.spend_store import SpendStoreError, SqliteSpendStore, open_spend_store


def test_sqlite_urls_name_the_file_they_say_and_malformed_ones_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_path(f"sqlite://{tmp_path}/f.sqlite") == tmp_path / "f.sqlite"
    assert sqlite_path("sqlite://relative.sqlite") == Path("relative.sqlite")
    for bad in (f"sqlite:{tmp_path}/f.sqlite", "sqlite:///", "sqlite://"):
        with pytest.raises(StoreError, match="give a file"):
            sqlite_path(bad)
    for given, file in (
        (f"sqlite://{tmp_path}/a.sqlite", tmp_path / "a.sqlite"),
        (str(tmp_path / "b.sqlite"), tmp_path / "b.sqlite"),
        ("c.sqlite", tmp_path / "c.sqlite"),
    ):
        store = open_spend_store(given)
        assert isinstance(store, SqliteSpendStore) and store.path.resolve() == file.resolve()
        store.close()
    for bad in (f"sqlite:{tmp_path}/d.sqlite", "", "  ", "mysql://db/x"):
        with pytest.raises(SpendStoreError):
            open_spend_store(bad)
    assert not list(tmp_path.glob("**/d.sqlite"))  # nothing was made for a refused location


def test_a_postgresql_url_psycopg_cannot_parse_is_refused_without_its_password() -> None:
    with pytest.raises(SpendStoreError) as info:
        open_spend_store("postgresql://router:s3%ZZcret@db.invalid/spend")
    assert "percent-encoded" in str(info.value) and "s3%ZZcret" not in str(info.value)
