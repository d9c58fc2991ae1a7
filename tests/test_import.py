import dynaexq


def test_version_is_exposed() -> None:
    assert dynaexq.__version__.count(".") == 2
