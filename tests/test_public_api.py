"""The public surface: flat, sorted, complete, importable and documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import httpx_upstream_auth as hua


def test_all_is_sorted() -> None:
    """__all__ is sorted (as httpx does), so additions land in one obvious place."""
    assert list(hua.__all__) == sorted(hua.__all__)


def test_all_has_no_duplicates() -> None:
    """Every name appears in __all__ once."""
    assert len(set(hua.__all__)) == len(hua.__all__)


def test_all_is_complete() -> None:
    """Every public class or function reachable from the package root is listed in __all__."""
    public = {
        name
        for name, value in vars(hua).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert public - set(hua.__all__) == set()


@pytest.mark.parametrize("name", sorted(hua.__all__))
def test_every_name_is_importable(name: str) -> None:
    """Each name in __all__ is importable from the package root."""
    namespace: dict[str, object] = {}
    exec(f"from httpx_upstream_auth import {name}", namespace)
    assert namespace[name] is getattr(hua, name)


@pytest.mark.parametrize("name", sorted(hua.__all__))
def test_every_public_name_has_a_docstring(name: str) -> None:
    """Each public name carries its own docstring (not one inherited from object or Exception)."""
    value = getattr(hua, name)
    doc = value.__dict__.get("__doc__") if inspect.isclass(value) else getattr(value, "__doc__", None)
    assert doc and doc.strip(), f"{name} has no docstring"


@pytest.mark.parametrize("name", [n for n in sorted(hua.__all__) if inspect.isclass(getattr(hua, n))])
def test_public_methods_have_docstrings(name: str) -> None:
    """Each public method and property defined by a public class has a docstring."""
    cls = getattr(hua, name)
    missing = [
        attr
        for attr, value in vars(cls).items()
        if not attr.startswith("_")
        and (inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod)))
        and not (inspect.getdoc(getattr(cls, attr)) if not isinstance(value, property) else value.__doc__)
    ]
    assert missing == [], f"{name} lacks docstrings on {missing}"


def test_package_docstring_and_version() -> None:
    """The package documents itself and has a version string."""
    assert hua.__doc__ and hua.__doc__.strip()
    assert isinstance(hua.__version__, str) and hua.__version__


def test_every_error_is_an_upstream_auth_error() -> None:
    """Every exception class exported is a subclass of UpstreamAuthError."""
    errors = [getattr(hua, n) for n in hua.__all__ if inspect.isclass(getattr(hua, n))]
    errors = [e for e in errors if issubclass(e, BaseException)]
    assert {e.__name__ for e in errors} >= {
        "BindingMismatch",
        "ReauthenticationRequired",
        "RefreshFailed",
        "StorageError",
        "UpstreamAuthError",
    }
    assert all(issubclass(e, hua.UpstreamAuthError) for e in errors)


def test_open_storage_by_url(tmp_path: Path) -> None:
    """open_storage() opens memory and SQLite stores from URLs, a registered scheme from its factory, and
    refuses an unknown scheme without repeating the URL (it may carry a password)."""
    assert isinstance(hua.open_storage("memory"), hua.MemoryStorage)
    for url in (f"sqlite://{tmp_path}/a.db", f"sqlite:{tmp_path}/b.db"):
        store = hua.open_storage(url)
        assert isinstance(store, hua.SQLiteStorage) and Path(store.path).parent == tmp_path
        store.close()
    made: list[str] = []

    def factory(url: str) -> hua.Storage:
        made.append(url)
        return hua.MemoryStorage()

    hua.register_storage("vault", factory)
    assert isinstance(hua.open_storage("vault://team/tokens"), hua.MemoryStorage) and made == ["vault://team/tokens"]
    for pathless in ("sqlite:", "sqlite://"):
        with pytest.raises(ValueError, match="a sqlite storage URL needs a path"):
            hua.open_storage(pathless)
    with pytest.raises(ValueError, match="known: ") as caught:
        hua.open_storage("postgres://user:s3cret@db/tokens")
    assert "s3cret" not in str(caught.value)


def test_an_auth_names_its_session() -> None:
    """``manager.auth(session)`` tells which session it sends tokens for; its repr names the provider only."""
    refresher = hua.OAuth2Refresher("https://p.example/token", "my-app", "secret")
    manager = hua.TokenManager(refresher=refresher, provider_id="p", storage=hua.MemoryStorage())
    auth = manager.auth("session-7")
    assert auth.session_id == "session-7"
    assert repr(auth) == "UpstreamAuth(provider_id='p', expect=None)"
    manager.close()
